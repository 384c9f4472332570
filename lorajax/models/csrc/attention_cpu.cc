// Fused self-attention for XLA:CPU (forward and backward), called through jax.ffi.
//
// Computes, for every query head (kv head k, group g) of q [N, S, K, G, D] reading k, v [N, S, K, D]:
//   o = softmax(q kᵀ · D^-0.5 + mask) v,   mask [N, S, S] (true = visible; a hidden entry's score is
//   float32's lowest value, as lorajax.models.attention.dense_attention does),
// and lse [N, K, G, S] = the rows' log-sum-exp (the backward's residual). N is every leading dimension
// folded together (a vmapped batch included). Everything is float32.
//
// Method: FlashAttention-2's tiling on a CPU (T. Dao, "FlashAttention-2", arXiv:2307.08691, Algorithms 1
// and 2): queries and keys in blocks of 64; each query block reads only the key blocks its rows can see
// when `causal` (and, with a sliding `window`, not the blocks before it), keeps a running row maximum and
// sum (online softmax) instead of the [S, S] score matrix, and the backward recomputes each block's
// probabilities from lse. One work unit is one (n, kv head); units run on XLA's intra-op thread pool.
// Per unit the kv head's K and V are copied once into contiguous, zero-padded [S, Dp] rows and [Dp, S]
// columns so every block product is a small dense matmul with unit-stride inner loops (16-wide vectors in 8x32
// register tiles); a block whose mask entries are all visible skips the mask (`FullBlocks`). On a causal
// diagonal block (query block = key block) the products skip the register tiles and contraction ranges that
// only meet keys after the query (`Tri`), and the exponentials stop at each row's last 8-column group that
// can hold a visible key: about a third of such a block's work, with the same values on every row that has a
// visible key.
//
// A row with no visible key gets the mean of the values it read (undefined in the reference as well).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <limits>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 64;  // query and key rows per block
constexpr float kNeg = -std::numeric_limits<float>::max();
constexpr float kInf = std::numeric_limits<float>::infinity();

typedef float v8 __attribute__((vector_size(32)));

inline int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

typedef int32_t v8i __attribute__((vector_size(32)));

inline v8 Load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, 32);
  return v;
}
inline void Store8(float* p, v8 v) { std::memcpy(p, &v, 32); }
inline float HMax(v8 v) {
  float m = v[0];
  for (int i = 1; i < 8; ++i) m = std::max(m, v[i]);
  return m;
}
inline float HSum(v8 v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }

// exp(x) for x <= 0, 8 lanes: 2^n · p(r), n = round(x / ln2), r = x - n ln2 (two-part ln2), |r| <= ln2/2,
// p the degree-6 Taylor polynomial (relative error < 2e-7); exactly 0 below -87 (and for -inf).
inline v8 ExpNonPositive(v8 x) {
  const v8 lo = v8{} - 87.0f;
  const v8 xc = x < lo ? lo : x;
  const v8 magic = v8{} + 12582912.0f;  // 1.5 · 2^23: adding it rounds to an integer
  const v8 n = (xc * 1.44269504088896341f + magic) - magic;
  const v8 r = (xc - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  v8 p = v8{} + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
  v8 scale;
  std::memcpy(&scale, &bits, 32);
  return x < lo ? v8{} : p * scale;
}
inline float ExpNonPositive(float x) { return ExpNonPositive(v8{} + x)[0]; }

// Which part of a causal diagonal block a product needs (local query row r, key column c, visible only if
// c <= r; i is the first of the R rows of C in a register tile):
//   kAll          everything;
//   kColsUpToRow  C[r, c] = q_r·k_c only for the column tiles that start at or before the tile's last row
//                 (the others are written as 0: the mask then hides them);
//   kKUpToRow     C[r, :] = Σ_c A[r, c] B[c, :] over c < i + R (A = P or dS, zero after the row);
//   kKFromRow     C[c, :] = Σ_r A[r, c] B[r, :] over r >= i (kTransA; A = P or dS, zero before the key).
enum Tri { kAll, kColsUpToRow, kKUpToRow, kKFromRow };

// C[M, N] (+)= op(A) · B[Kd, N], op(A) = A[M, Kd] (row stride lda) or, with kTransA, A[Kd, M]ᵀ; row strides
// lda, ldb, ldc in floats. Register tiles: R rows of C by W columns stay in registers over the whole Kd loop
// (broadcast one A element per row, W/V vector loads of B per k). M a multiple of R, N of W; `col0` is the
// first column's index in the block (for kColsUpToRow).
template <typename Vec, int R, int W, bool kAccumulate, bool kTransA>
void GemmTile(int64_t M, int64_t N, int64_t Kd, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
              int64_t ldc, Tri tri, int64_t col0) {
  constexpr int L = sizeof(Vec) / sizeof(float), U = W / L;
  for (int64_t i = 0; i < M; i += R) {
    const int64_t k_lo = tri == kKFromRow ? std::min(i, Kd) : 0;
    const int64_t k_hi = tri == kKUpToRow ? std::min(Kd, i + R) : Kd;
    for (int64_t j = 0; j < N; j += W) {
      if (tri == kColsUpToRow && col0 + j > i + R - 1) {
        if (!kAccumulate)
          for (int r = 0; r < R; ++r) std::memset(C + (i + r) * ldc + j, 0, W * sizeof(float));
        continue;
      }
      Vec c[R][U];
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int u = 0; u < U; ++u) c[r][u] = Vec{};
      const float* b = B + j + k_lo * ldb;
      for (int64_t k = k_lo; k < k_hi; ++k, b += ldb) {
        Vec bv[U];
#pragma GCC unroll 4
        for (int u = 0; u < U; ++u) std::memcpy(&bv[u], b + u * L, sizeof(Vec));
        const float* a = kTransA ? A + k * lda + i : A + i * lda + k;
        const int64_t st = kTransA ? 1 : lda;
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const Vec x = Vec{} + a[r * st];
#pragma GCC unroll 4
          for (int u = 0; u < U; ++u) c[r][u] += x * bv[u];
        }
      }
      float* cc = C + i * ldc + j;
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int u = 0; u < U; ++u) {
          Vec out = c[r][u];
          if (kAccumulate) {
            Vec old;
            std::memcpy(&old, cc + r * ldc + u * L, sizeof(Vec));
            out += old;
          }
          std::memcpy(cc + r * ldc + u * L, &out, sizeof(Vec));
        }
    }
  }
}

typedef float v16 __attribute__((vector_size(64)));

// M a multiple of 8 (every caller passes kBlock rows), N a multiple of 16. Columns in 32-wide tiles of 8 rows
// (16 accumulators of 16 floats: 2x the 8-wide 4x16 tile's rate on an AVX-512 core, and no slower on AVX2,
// where the compiler splits each 16-float vector in two), a 16-wide remainder in 8x16 tiles.
template <bool kAccumulate, bool kTransA = false>
void Gemm(int64_t M, int64_t N, int64_t Kd, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, Tri tri = kAll) {
  const int64_t N32 = N / 32 * 32;
  if (N32 > 0) GemmTile<v16, 8, 32, kAccumulate, kTransA>(M, N32, Kd, A, lda, B, ldb, C, ldc, tri, 0);
  if (N32 < N)
    GemmTile<v16, 8, 16, kAccumulate, kTransA>(M, N - N32, Kd, A, lda, B + N32, ldb, C + N32, ldc, tri, N32);
}

// One past the last column of local row r that a causal diagonal block may need, in 8-column groups.
inline int64_t DiagEnd(int64_t r) { return std::min(kBlock, RoundUp(r + 1, 8)); }

struct Geometry {
  int64_t N, S, K, G, D;  // leading batch, sequence, kv heads, groups per kv head, head dim
  int64_t Sp, Dp;         // S rounded up to kBlock, D rounded up to 16
  bool causal;
  int64_t window;  // 0: none
  float scale;
  int64_t QRow() const { return K * G * D; }  // stride of one sequence position in q / o
  int64_t KRow() const { return K * D; }      // ... in k / v
  // first key block that any query of block [r0, r0 + kBlock) may see, and one past the last
  int64_t KeyLo(int64_t r0) const { return (causal && window > 0) ? std::max<int64_t>(0, r0 - window + 1) / kBlock : 0; }
  int64_t KeyHi(int64_t r0) const { return causal ? std::min(S, r0 + kBlock) : S; }
  // whether key block kb is query block [r0, r0 + kBlock)'s causal diagonal (keys after a row's query hidden)
  bool Diagonal(int64_t r0, int64_t kb) const { return causal && kb * kBlock == r0; }
};

Geometry MakeGeometry(const ffi::Span<const int64_t>& qd, bool causal, int64_t window) {
  Geometry g{};
  const size_t r = qd.size();
  g.N = 1;
  for (size_t i = 0; i + 4 < r; ++i) g.N *= qd[i];
  g.S = qd[r - 4];
  g.K = qd[r - 3];
  g.G = qd[r - 2];
  g.D = qd[r - 1];
  g.Sp = RoundUp(std::max<int64_t>(g.S, 1), kBlock);
  g.Dp = RoundUp(std::max<int64_t>(g.D, 1), 16);
  g.causal = causal;
  g.window = window;
  g.scale = 1.0f / std::sqrt(static_cast<float>(g.D));
  return g;
}

// Runs body(unit) for unit in [0, units) on the intra-op pool; the calling thread works too and returns once
// every claimed unit is done. It never waits for a helper that has not started (the pool's threads may all be
// busy, e.g. with another call like this one): a helper that starts late finds no unit left and only touches
// the shared, reference-counted state.
// A worker's buffers, reused by every work unit it runs in one call: no allocation, first-touch page faults or
// zero-filling per unit (per-unit buffers had cost about a sixth of the kernel's time); freed when the call
// returns. Slot `slot` holds at least n floats, with whatever its last user left there.
struct Workspace {
  static constexpr int kSlots = 13;
  std::vector<float> bufs[kSlots];
  float* Get(int slot, size_t n) {
    if (bufs[slot].size() < n) bufs[slot].resize(n);
    return bufs[slot].data();
  }
};

struct ParallelState {
  std::mutex mu;
  std::condition_variable cv;
  int64_t next = 0, inflight = 0, units = 0;
  const std::function<void(int64_t, Workspace&)>* body = nullptr;
  void Work() {
    Workspace ws;
    for (;;) {
      int64_t u;
      {
        std::lock_guard<std::mutex> lock(mu);
        if (next >= units) return;
        u = next++;
        ++inflight;
      }
      (*body)(u, ws);
      std::lock_guard<std::mutex> lock(mu);
      if (--inflight == 0 && next >= units) cv.notify_all();
    }
  }
};

void ParallelFor(ffi::ThreadPool& pool, int64_t units, const std::function<void(int64_t, Workspace&)>& body) {
  auto state = std::make_shared<ParallelState>();
  state->units = units;
  state->body = &body;
  const int64_t helpers = std::max<int64_t>(0, std::min<int64_t>(pool.num_threads(), units) - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([state]() { state->Work(); });
  state->Work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->inflight == 0; });
}

// Row stride of a transposed key block [Dp][kLdT]: kBlock plus 16 floats, so the Dp rows of a block do not all
// fall into the same few L1 sets (a stride of a power-of-two kilobytes would).
constexpr int64_t kLdT = kBlock + 16;


// Whether [S, D] rows sit in larger [Sp, Dp] buffers, whose padding must then be zero.
inline bool Padded(const Geometry& g) { return g.S != g.Sp || g.D != g.Dp; }

// Per unit: K (or V) of kv head k as rows [Sp][Dp] and, per key block, columns [Dp][kLdT]; zero-padded
// (the kLdT - kBlock columns past each block are stride only and never read). Buffers: workspace slots slot, slot+1.
struct HeadCopy {
  float *rows = nullptr, *cols = nullptr;
  void Load(const Geometry& g, const float* base, int64_t n, int64_t k, Workspace& ws, int slot) {
    const size_t nr = g.Sp * g.Dp, nc = (g.Sp / kBlock) * g.Dp * kLdT;
    rows = ws.Get(slot, nr);
    cols = ws.Get(slot + 1, nc);
    if (Padded(g)) {
      std::fill(rows, rows + nr, 0.0f);
      std::fill(cols, cols + nc, 0.0f);
    }
    for (int64_t s = 0; s < g.S; ++s) {
      const float* src = base + (n * g.S + s) * g.KRow() + k * g.D;
      std::memcpy(rows + s * g.Dp, src, g.D * sizeof(float));
      float* col = Col(g, s / kBlock) + s % kBlock;
      for (int64_t d = 0; d < g.D; ++d) col[d * kLdT] = src[d];
    }
  }
  float* Col(const Geometry& g, int64_t kb) { return cols + kb * g.Dp * kLdT; }
  const float* Col(const Geometry& g, int64_t kb) const { return cols + kb * g.Dp * kLdT; }
  const float* Row(const Geometry& g, int64_t kb) const { return rows + kb * kBlock * g.Dp; }
};

// Copies rows of head (k, g) of a [N, S, K, G, D] tensor into a zero-padded [Sp][Dp] buffer.
void GatherQ(const Geometry& g, const float* base, int64_t n, int64_t k, int64_t gi, float* dst) {
  if (Padded(g)) std::fill(dst, dst + g.Sp * g.Dp, 0.0f);
  for (int64_t s = 0; s < g.S; ++s)
    std::memcpy(dst + s * g.Dp, base + (n * g.S + s) * g.QRow() + (k * g.G + gi) * g.D, g.D * sizeof(float));
}

void ScatterQ(const Geometry& g, const float* src, int64_t n, int64_t k, int64_t gi, float* base) {
  for (int64_t s = 0; s < g.S; ++s)
    std::memcpy(base + (n * g.S + s) * g.QRow() + (k * g.G + gi) * g.D, src + s * g.Dp, g.D * sizeof(float));
}

// Per query block and key block of one batch row's mask: whether every entry is visible (then the scores need
// no mask, only the scale). Computed per work unit from mask [S, S] (64-bit words; a ragged tail compared bytewise).
std::vector<uint8_t> FullBlocks(const Geometry& g, const uint8_t* mask_n) {
  const int64_t nb = g.Sp / kBlock;
  std::vector<uint8_t> full(nb * nb, 0);
  for (int64_t rb = 0; rb < nb; ++rb) {
    const int64_t r0 = rb * kBlock;
    if (r0 + kBlock > g.S) continue;  // padded query rows: the general path
    for (int64_t kb = 0; kb < nb; ++kb) {
      const int64_t c0 = kb * kBlock;
      if (c0 + kBlock > g.S) continue;
      bool all = true;
      for (int64_t r = 0; r < kBlock && all; ++r) {
        const uint8_t* m = mask_n + (r0 + r) * g.S + c0;
        uint64_t acc = ~uint64_t{0};
        for (int64_t c = 0; c < kBlock; c += 8) {
          uint64_t w;
          std::memcpy(&w, m + c, 8);
          // bool bytes are 0 or 1: a word is all-visible iff every byte is 1
          acc &= (w == 0x0101010101010101ull) ? ~uint64_t{0} : 0;
        }
        all = acc != 0;
      }
      full[rb * nb + kb] = all;
    }
  }
  return full;
}

// Scaled, masked scores of query rows [r0, r0 + kBlock) against key block kb: s[kBlock][kBlock].
// Hidden keys score kNeg (as the reference); keys past S score -inf (they do not exist).
void Scores(const Geometry& g, const float* q, const HeadCopy& kh, const uint8_t* mask_n, int64_t r0, int64_t kb,
            bool full, bool diag, float* s) {
  const int64_t c0 = kb * kBlock;
  Gemm<false>(kBlock, kBlock, g.Dp, q + r0 * g.Dp, g.Dp, kh.Col(g, kb), kLdT, s, kBlock, diag ? kColsUpToRow : kAll);
  const int64_t valid = std::min(kBlock, g.S - c0);
  const v8 scale = v8{} + g.scale, neg = v8{} + kNeg;
  if (full) {  // every entry visible: scale only
    for (int64_t i = 0; i < kBlock * kBlock; i += 8) Store8(s + i, Load8(s + i) * scale);
    return;
  }
  for (int64_t r = 0; r < kBlock; ++r) {
    float* row = s + r * kBlock;
    const int64_t qr = std::min(r0 + r, g.S - 1);  // padded query rows reuse the last row's mask
    const uint8_t* m = mask_n + qr * g.S + c0;
    if (valid == kBlock) {
      for (int64_t c = 0; c < kBlock; c += 8) {
        v8i keep;
        for (int i = 0; i < 8; ++i) keep[i] = m[c + i] ? -1 : 0;
        const v8 x = Load8(row + c) * scale;
        Store8(row + c, keep != 0 ? x : neg);
      }
    } else {
      for (int64_t c = 0; c < valid; ++c) row[c] = m[c] ? row[c] * g.scale : kNeg;
      for (int64_t c = valid; c < kBlock; ++c) row[c] = -kInf;
    }
  }
}

void Forward(const Geometry& g, const float* q, const float* k, const float* v, const uint8_t* mask, float* o,
             float* lse, ffi::ThreadPool& pool) {
  ParallelFor(pool, g.N * g.K, [&](int64_t unit, Workspace& ws) {
    const int64_t n = unit / g.K, kh = unit % g.K;
    HeadCopy kc, vc;
    kc.Load(g, k, n, kh, ws, 0);
    vc.Load(g, v, n, kh, ws, 2);
    const int64_t SD = g.Sp * g.Dp;
    float *qb = ws.Get(4, SD), *ob = ws.Get(5, SD), *s = ws.Get(6, kBlock * kBlock);
    float *m = ws.Get(7, kBlock), *l = ws.Get(8, kBlock);
    const uint8_t* mask_n = mask + n * g.S * g.S;
    const std::vector<uint8_t> full = FullBlocks(g, mask_n);
    const int64_t nb = g.Sp / kBlock;
    for (int64_t gi = 0; gi < g.G; ++gi) {
      GatherQ(g, q, n, kh, gi, qb);
      std::fill(ob, ob + SD, 0.0f);
      float* lse_row = lse + ((n * g.K + kh) * g.G + gi) * g.S;
      for (int64_t r0 = 0; r0 < g.S; r0 += kBlock) {
        std::fill(m, m + kBlock, -kInf);
        std::fill(l, l + kBlock, 0.0f);
        float* orow = ob + r0 * g.Dp;
        const int64_t kb_hi = (g.KeyHi(r0) + kBlock - 1) / kBlock;
        for (int64_t kb = g.KeyLo(r0); kb < kb_hi; ++kb) {
          const bool diag = g.Diagonal(r0, kb);
          Scores(g, qb, kc, mask_n, r0, kb, full[r0 / kBlock * nb + kb], diag, s);
          for (int64_t r = 0; r < kBlock; ++r) {
            float* row = s + r * kBlock;
            const int64_t cend = diag ? DiagEnd(r) : kBlock;
            v8 vmax = v8{} + m[r];
            for (int64_t c = 0; c < cend; c += 8) {
              const v8 x = Load8(row + c);
              vmax = x > vmax ? x : vmax;
            }
            const float mx = HMax(vmax);
            const float corr = ExpNonPositive(m[r] - mx);  // m = -inf at the first block: 0
            const v8 vmx = v8{} + mx;
            v8 vsum = {};
            for (int64_t c = 0; c < cend; c += 8) {
              const v8 e = ExpNonPositive(Load8(row + c) - vmx);
              Store8(row + c, e);
              vsum += e;
            }
            l[r] = l[r] * corr + HSum(vsum);
            m[r] = mx;
            if (corr != 1.0f) {
              float* od = orow + r * g.Dp;
              for (int64_t d = 0; d < g.Dp; d += 8) Store8(od + d, Load8(od + d) * corr);
            }
          }
          Gemm<true>(kBlock, g.Dp, kBlock, s, kBlock, vc.Row(g, kb), g.Dp, orow, g.Dp, diag ? kKUpToRow : kAll);
        }
        for (int64_t r = 0; r < kBlock && r0 + r < g.S; ++r) {
          const float inv = 1.0f / l[r];
          float* od = orow + r * g.Dp;
          for (int64_t d = 0; d < g.Dp; d += 8) Store8(od + d, Load8(od + d) * inv);
          lse_row[r0 + r] = m[r] + std::log(l[r]);
        }
      }
      ScatterQ(g, ob, n, kh, gi, o);
    }
  });
}

void Backward(const Geometry& g, const float* q, const float* k, const float* v, const uint8_t* mask, const float* o,
              const float* lse, const float* dout, float* dq, float* dk, float* dv, ffi::ThreadPool& pool) {
  ParallelFor(pool, g.N * g.K, [&](int64_t unit, Workspace& ws) {
    const int64_t n = unit / g.K, kh = unit % g.K;
    HeadCopy kc, vc;
    kc.Load(g, k, n, kh, ws, 0);
    vc.Load(g, v, n, kh, ws, 2);
    const int64_t SD = g.Sp * g.Dp;
    float *qb = ws.Get(4, SD), *dob = ws.Get(5, SD), *ob = ws.Get(6, SD), *dqb = ws.Get(7, SD);
    float *dkb = ws.Get(8, SD), *dvb = ws.Get(9, SD);
    float *p = ws.Get(10, kBlock * kBlock), *dp = ws.Get(11, kBlock * kBlock), *delta = ws.Get(12, g.Sp);
    std::fill(dkb, dkb + SD, 0.0f);
    std::fill(dvb, dvb + SD, 0.0f);
    const uint8_t* mask_n = mask + n * g.S * g.S;
    const std::vector<uint8_t> full = FullBlocks(g, mask_n);
    const int64_t nb = g.Sp / kBlock;
    for (int64_t gi = 0; gi < g.G; ++gi) {
      GatherQ(g, q, n, kh, gi, qb);
      GatherQ(g, dout, n, kh, gi, dob);
      GatherQ(g, o, n, kh, gi, ob);
      std::fill(dqb, dqb + SD, 0.0f);
      const float* lse_row = lse + ((n * g.K + kh) * g.G + gi) * g.S;
      for (int64_t s = 0; s < g.Sp; ++s) {  // delta_r = rowsum(dO ∘ O)
        v8 acc = {};
        for (int64_t d = 0; d < g.Dp; d += 8) acc += Load8(dob + s * g.Dp + d) * Load8(ob + s * g.Dp + d);
        delta[s] = HSum(acc);
      }
      for (int64_t r0 = 0; r0 < g.S; r0 += kBlock) {
        const int64_t kb_hi = (g.KeyHi(r0) + kBlock - 1) / kBlock;
        const float* dorow = dob + r0 * g.Dp;
        for (int64_t kb = g.KeyLo(r0); kb < kb_hi; ++kb) {
          const int64_t c0 = kb * kBlock;
          const bool diag = g.Diagonal(r0, kb);
          Scores(g, qb, kc, mask_n, r0, kb, full[r0 / kBlock * nb + kb], diag, p);
          for (int64_t r = 0; r < kBlock; ++r) {  // P = exp(s - lse); padded query rows contribute nothing
            float* row = p + r * kBlock;
            if (r0 + r >= g.S) {
              std::fill(row, row + kBlock, 0.0f);
              continue;
            }
            const v8 ls = v8{} + lse_row[r0 + r], zero = {};
            for (int64_t c = 0, cend = diag ? DiagEnd(r) : kBlock; c < cend; c += 8) {
              const v8 x = Load8(row + c) - ls;
              Store8(row + c, ExpNonPositive(x < zero ? x : zero));
            }
          }
          // dV_kb += Pᵀ dO
          Gemm<true, true>(kBlock, g.Dp, kBlock, p, kBlock, dorow, g.Dp, dvb + c0 * g.Dp, g.Dp,
                           diag ? kKFromRow : kAll);
          // dP = dO Vᵀ; dS = P ∘ (dP − delta) · scale (the gradient of the unscaled product q·k)
          Gemm<false>(kBlock, kBlock, g.Dp, dorow, g.Dp, vc.Col(g, kb), kLdT, dp, kBlock,
                      diag ? kColsUpToRow : kAll);
          const v8 scale = v8{} + g.scale;
          for (int64_t r = 0; r < kBlock; ++r) {
            const v8 dl = v8{} + delta[r0 + r];
            float* ds = dp + r * kBlock;
            const float* pr = p + r * kBlock;
            for (int64_t c = 0, cend = diag ? DiagEnd(r) : kBlock; c < cend; c += 8)
              Store8(ds + c, Load8(pr + c) * (Load8(ds + c) - dl) * scale);
          }
          // dQ += dS K; dK_kb += dSᵀ Q
          Gemm<true>(kBlock, g.Dp, kBlock, dp, kBlock, kc.Row(g, kb), g.Dp, dqb + r0 * g.Dp, g.Dp,
                     diag ? kKUpToRow : kAll);
          Gemm<true, true>(kBlock, g.Dp, kBlock, dp, kBlock, qb + r0 * g.Dp, g.Dp,
                           dkb + c0 * g.Dp, g.Dp, diag ? kKFromRow : kAll);
        }
      }
      ScatterQ(g, dqb, n, kh, gi, dq);
    }
    for (int64_t s = 0; s < g.S; ++s) {
      std::memcpy(dk + (n * g.S + s) * g.KRow() + kh * g.D, dkb + s * g.Dp, g.D * sizeof(float));
      std::memcpy(dv + (n * g.S + s) * g.KRow() + kh * g.D, dvb + s * g.Dp, g.D * sizeof(float));
    }
  });
}

ffi::Error CheckShapes(const ffi::Span<const int64_t>& qd, const ffi::Span<const int64_t>& kd,
                       const ffi::Span<const int64_t>& md) {
  if (qd.size() < 4 || kd.size() != qd.size() - 1 || md.size() != qd.size() - 2)
    return ffi::Error::InvalidArgument("attention_cpu: want q [..., S, K, G, D], k/v [..., S, K, D], mask [..., S, S]");
  const size_t r = qd.size();
  for (size_t i = 0; i + 4 < r; ++i)
    if (kd[i] != qd[i] || md[i] != qd[i]) return ffi::Error::InvalidArgument("attention_cpu: leading dims differ");
  if (kd[r - 4] != qd[r - 4] || kd[r - 3] != qd[r - 3] || kd[r - 2] != qd[r - 1] || md[r - 4] != qd[r - 4] ||
      md[r - 3] != qd[r - 4])
    return ffi::Error::InvalidArgument("attention_cpu: q, k/v and mask shapes do not agree");
  return ffi::Error::Success();
}

ffi::Error FwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse,
                   int64_t causal, int64_t window) {
  if (auto e = CheckShapes(q.dimensions(), k.dimensions(), mask.dimensions()); e.failure()) return e;
  const Geometry g = MakeGeometry(q.dimensions(), causal != 0, window);
  if (g.S == 0 || g.N == 0 || g.K == 0 || g.G == 0) return ffi::Error::Success();
  Forward(g, q.typed_data(), k.typed_data(), v.typed_data(), reinterpret_cast<const uint8_t*>(mask.typed_data()),
          o->typed_data(), lse->typed_data(), pool);
  return ffi::Error::Success();
}

ffi::Error BwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse,
                   ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                   ffi::ResultBuffer<ffi::F32> dv, int64_t causal, int64_t window) {
  if (auto e = CheckShapes(q.dimensions(), k.dimensions(), mask.dimensions()); e.failure()) return e;
  const Geometry g = MakeGeometry(q.dimensions(), causal != 0, window);
  if (g.S == 0 || g.N == 0 || g.K == 0 || g.G == 0) return ffi::Error::Success();
  Backward(g, q.typed_data(), k.typed_data(), v.typed_data(), reinterpret_cast<const uint8_t*>(mask.typed_data()),
           o.typed_data(), lse.typed_data(), dout.typed_data(), dq->typed_data(), dk->typed_data(), dv->typed_data(),
           pool);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LorajaxAttentionFwd, FwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("causal")
                                  .Attr<int64_t>("window"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LorajaxAttentionBwd, BwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("causal")
                                  .Attr<int64_t>("window"));
