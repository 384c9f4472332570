"""A SYNTHETIC protein grammar with property classes, its tokenizer and its exact oracle classifier.

No protein corpus ships in a pip package this project can use offline (the
PyPI names matching protein/UniProt/UniRef are API clients, predictors or
structure tools that fetch data at run time), and a real corpus has no exact
oracle for "does this generated sequence have property c". So the sequences
here are drawn from a known generative model, the design of the offline
experiment in the project's spec for Shah & Jayaratnam, "Energy-Efficient
Protein Language Models: Leveraging Small Language Models with LoRA for
Controllable Protein Generation", arXiv:2411.05966 (no official code is
public; the prompt format follows ProLLaMA's ``Seq=<...>`` lines and
``[Generate by ...]`` instruction tags, PKU-YuanGroup/ProLLaMA
``scripts/instruction_tuning_dataset/example.json``).

The grammar (`Grammar`, drawn by `make_grammar` from a seed): ``K`` property
classes over the 20 amino-acid letters `AMINO_ACIDS`. Class ``k`` is a
first-order Markov chain with start distribution ``π_k [A]`` and transition
matrix ``T_k [A, A]`` (rows Dirichlet(`CONCENTRATION`)), plus a class motif
``m_k`` (3 letters). A sequence of class ``k`` (`sample`): ``x_0 ~ π_k``,
``x_t ~ T_k[x_{t-1}]`` for ``t < L``, then ``x[p:p+3] = m_k`` at a position
``p ~ U{0, .., L-3}`` (overwritten, so the length stays ``L``).

The exact oracle (`log_likelihoods`, `classify`): under that model, with
``P_k(x_{a..b})`` the chain's probability of a stretch,

    p(x | k) = 1/(L-2) · Σ_{p : x[p:p+3] = m_k}  P_k(x_0..x_{p-1}) · bridge · P_k(x_{p+4}..x_{L-1} | x_{p+3})

where the chain went on from the overwritten letters, so the bridge sums them
out: ``bridge = (T_k^4)[x_{p-1}, x_{p+3}]`` (``(π_k T_k^3)[x_3]`` at ``p = 0``;
1 when the motif ends the sequence). `classify` is ``argmax_k p(x | k)``
(the Bayes classifier under equal class priors); a sequence holding no class's
motif (possible for generated text) falls back to the plain chain likelihood
``argmax_k P_k(x)``. `properties` gives the measurable properties: length,
composition, motif presence, whether only amino-acid letters were produced.

Tokens (`ProteinTokenizer`): ``<pad>`` (0), ``<bos>``, ``>`` (end of sequence),
``Seq=<``, ``[Gen]``, the tags ``P0 .. P{K-1}``, then the 20 letters. A tagged
record is ``<bos> [Gen] P<c> Seq=< x_0 .. x_{L-1} >``; an untagged one
``<bos> Seq=< x_0 .. x_{L-1} >``. Text is tokenized by `ProteinTokenizer.encode`
(whitespace ignored; ``P`` followed by digits is a tag, a lone ``P`` is
proline); a tag it does not know raises ValueError naming it and the known tags.

Shapes: ``A = 20`` letters, ``K`` classes, ``L`` letters per sequence.

Example:
  >>> g = make_grammar(seed=0)
  >>> seqs = sample(g, [0, 1, 2, 3], seed=1)
  >>> [len(s) for s in seqs], classify(g, seqs).tolist()
  ([48, 48, 48, 48], [0, 1, 2, 3])
  >>> tok = ProteinTokenizer(g.num_classes)
  >>> tok.decode(tok.record("MKV", tag=2))
  '<bos> [Gen] P2 Seq=< M K V >'
  >>> tok.encode("[Gen] P7 Seq=<")
  Traceback (most recent call last):
  ...
  ValueError: unknown property tag 'P7': the tokenizer knows P0, P1, P2, P3
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "AMINO_ACIDS",
    "LENGTH",
    "NUM_CLASSES",
    "MOTIF_LENGTH",
    "CONCENTRATION",
    "UNKNOWN",
    "Grammar",
    "make_grammar",
    "sample",
    "log_likelihoods",
    "classify",
    "properties",
    "ProteinTokenizer",
]

#: the 20 standard amino-acid letters (one-letter codes)
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
#: letters per sequence (the spec's 48)
LENGTH = 48
#: property classes (the spec's K = 4)
NUM_CLASSES = 4
#: letters of each class motif
MOTIF_LENGTH = 3
#: the letter `ProteinTokenizer.sequence` writes for a generated token that is not an amino acid
UNKNOWN = "X"
#: Dirichlet concentration of each transition row and start distribution (< 1: peaked, distinguishable chains)
CONCENTRATION = 0.3


@dataclasses.dataclass(frozen=True)
class Grammar:
    """K Markov chains over the letters and K motifs. ``start [K, A]``, ``trans [K, A, A]`` (rows sum to 1)."""

    start: np.ndarray
    trans: np.ndarray
    motifs: tuple[str, ...]
    length: int = LENGTH

    @property
    def num_classes(self) -> int:
        return len(self.motifs)


def make_grammar(seed: int = 0, num_classes: int = NUM_CLASSES, length: int = LENGTH) -> Grammar:
    """The grammar drawn from ``seed``: Dirichlet(`CONCENTRATION`) rows, distinct random motifs."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if length < MOTIF_LENGTH + 1:
        raise ValueError(f"length must be >= {MOTIF_LENGTH + 1} (a motif and one more letter), got {length}")
    rng = np.random.default_rng([seed, 0x9807])
    a = len(AMINO_ACIDS)
    start = rng.dirichlet(np.full(a, CONCENTRATION), size=num_classes)
    trans = rng.dirichlet(np.full(a, CONCENTRATION), size=(num_classes, a))
    motifs: list[str] = []
    while len(motifs) < num_classes:
        m = "".join(AMINO_ACIDS[i] for i in rng.integers(0, a, MOTIF_LENGTH))
        if m not in motifs:
            motifs.append(m)
    return Grammar(start=start, trans=trans, motifs=tuple(motifs), length=length)


def _draw(rng: np.random.Generator, probs_NxA: np.ndarray) -> np.ndarray:
    """One categorical draw per row of ``probs [N, A]`` (inverse CDF)."""
    cdf = np.cumsum(probs_NxA, axis=-1)
    u = rng.random((probs_NxA.shape[0], 1)) * cdf[:, -1:]
    return np.minimum((cdf < u).sum(-1), probs_NxA.shape[-1] - 1)


def sample(grammar: Grammar, classes: Sequence[int] | np.ndarray, seed: int) -> list[str]:
    """One sequence of class ``classes[i]`` per entry (strings of ``grammar.length`` letters), from ``seed``."""
    cls_N = np.asarray(classes, dtype=np.int64)
    if cls_N.ndim != 1 or (cls_N.size and (cls_N.min() < 0 or cls_N.max() >= grammar.num_classes)):
        raise ValueError(f"classes must be a 1-D list of ints in 0..{grammar.num_classes - 1}, got {classes!r}")
    n, length = len(cls_N), grammar.length
    rng = np.random.default_rng([seed, 0x5E9])
    x_NxL = np.zeros((n, length), np.int64)
    x_NxL[:, 0] = _draw(rng, grammar.start[cls_N])
    for t in range(1, length):
        x_NxL[:, t] = _draw(rng, grammar.trans[cls_N, x_NxL[:, t - 1]])
    pos_N = rng.integers(0, length - MOTIF_LENGTH + 1, n)
    out = []
    for i in range(n):
        letters = [AMINO_ACIDS[j] for j in x_NxL[i]]
        p = int(pos_N[i])
        letters[p : p + MOTIF_LENGTH] = grammar.motifs[cls_N[i]]
        out.append("".join(letters))
    return out


def _letter_ids(seq: str) -> np.ndarray:
    try:
        return np.array([AMINO_ACIDS.index(c) for c in seq], np.int64)
    except ValueError:
        bad = sorted({c for c in seq if c not in AMINO_ACIDS})
        raise ValueError(f"sequence has characters that are not amino-acid letters: {bad}") from None


def _chain_log_likelihood(grammar: Grammar, x_L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(total [K], prefix [K, L + 1])``: ``prefix[k, t] = log P_k(x_0..x_{t-1})``."""
    log_start, log_trans = np.log(grammar.start), np.log(grammar.trans)
    steps_KxL = np.concatenate([log_start[:, x_L[:1]], log_trans[:, x_L[:-1], x_L[1:]]], axis=1)
    prefix = np.concatenate([np.zeros((grammar.num_classes, 1)), np.cumsum(steps_KxL, axis=1)], axis=1)
    return prefix[:, -1], prefix


def _motif_log_likelihood(grammar: Grammar, x_L: np.ndarray, prefix_KxL1: np.ndarray) -> np.ndarray:
    """``[K]``: ``log p(x | k)`` of the full model (motif inserted at a uniform position); -inf without motif."""
    length, m = len(x_L), MOTIF_LENGTH
    out = np.full(grammar.num_classes, -np.inf)
    if length < m:
        return out
    for k, motif in enumerate(grammar.motifs):
        mk = _letter_ids(motif)
        terms = []
        for p in range(length - m + 1):
            if not np.array_equal(x_L[p : p + m], mk):
                continue
            before = prefix_KxL1[k, p]  # log P_k(x_0..x_{p-1})
            j = p + m  # first letter after the motif
            if j >= length:
                bridge = after = 0.0
            else:
                if p == 0:
                    bridge_p = grammar.start[k] @ np.linalg.matrix_power(grammar.trans[k], m)
                    bridge = float(np.log(bridge_p[x_L[j]]))
                else:
                    bridge = float(np.log(np.linalg.matrix_power(grammar.trans[k], m + 1)[x_L[p - 1], x_L[j]]))
                after = prefix_KxL1[k, length] - prefix_KxL1[k, j + 1]  # log P_k(x_{j+1}.. | x_j)
            terms.append(before + bridge + after)
        if terms:
            out[k] = np.logaddexp.reduce(terms) - np.log(length - m + 1)
    return out


def log_likelihoods(grammar: Grammar, seqs: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(full [N, K], chain [N, K])``: each sequence's exact ``log p(x | k)`` under the full model (-inf when
    class k's motif is absent) and under the plain chain ``log P_k(x)``. Empty sequences score 0 (a tie)."""
    full, chain = [], []
    for seq in seqs:
        x_L = _letter_ids(seq)
        if len(x_L) == 0:
            full.append(np.zeros(grammar.num_classes))
            chain.append(np.zeros(grammar.num_classes))
            continue
        total, prefix = _chain_log_likelihood(grammar, x_L)
        full.append(_motif_log_likelihood(grammar, x_L, prefix))
        chain.append(total)
    k = grammar.num_classes
    return np.array(full).reshape(-1, k), np.array(chain).reshape(-1, k)


def classify(grammar: Grammar, seqs: Iterable[str]) -> np.ndarray:
    """``[N]`` int: the oracle class of each sequence (letters only): ``argmax_k log p(x | k)``, or
    ``argmax_k log P_k(x)`` for a sequence holding no class's motif."""
    full_NxK, chain_NxK = log_likelihoods(grammar, seqs)
    has_motif_N = np.isfinite(full_NxK).any(-1)
    return np.where(has_motif_N, full_NxK.argmax(-1), chain_NxK.argmax(-1)).astype(np.int64)


def properties(grammar: Grammar, seq: str) -> dict:
    """The measurable properties of a (generated) string: ``length`` (characters), ``valid`` (only amino-acid
    letters), ``composition`` (``[A]`` letter frequencies), ``motifs`` (``[K]`` bool: class motif present)."""
    counts = np.array([seq.count(c) for c in AMINO_ACIDS], np.float64)
    return {
        "length": len(seq),
        "valid": all(c in AMINO_ACIDS for c in seq),
        "composition": counts / max(counts.sum(), 1.0),
        "motifs": np.array([m in seq for m in grammar.motifs]),
    }


class ProteinTokenizer:
    """Tokens: ``<pad>``, ``<bos>``, ``>`` (end of sequence), ``Seq=<``, ``[Gen]``, ``P0..P{K-1}``, the letters."""

    PAD, BOS, EOS, SEQ, GEN = "<pad>", "<bos>", ">", "Seq=<", "[Gen]"
    _TOKEN = re.compile(r"\s*(<pad>|<bos>|Seq=<|>|\[[^\]]*\]|P\d+|\S)")

    def __init__(self, num_classes: int = NUM_CLASSES):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.tags = tuple(f"P{c}" for c in range(num_classes))
        self.vocab = (self.PAD, self.BOS, self.EOS, self.SEQ, self.GEN, *self.tags, *AMINO_ACIDS)
        self._ids = {t: i for i, t in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.seq_id, self.gen_id = 3, 4

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def tag_id(self, tag: str | int) -> int:
        """The id of tag ``"P<c>"`` (or class ``c``); an unknown tag raises ValueError naming the known ones."""
        name = f"P{tag}" if isinstance(tag, (int, np.integer)) else str(tag)
        if name not in self.tags:
            raise ValueError(f"unknown property tag {name!r}: the tokenizer knows {', '.join(self.tags)}")
        return self._ids[name]

    def encode(self, text: str) -> np.ndarray:
        """int32 ids of ``text`` (e.g. ``"<bos> [Gen] P1 Seq=< MKV >"``; whitespace is ignored)."""
        ids, pos = [], 0
        text = text.rstrip()
        while pos < len(text):
            match = self._TOKEN.match(text, pos)
            if match is None:  # only trailing whitespace is left
                break
            token, pos = match.group(1), match.end()
            if re.fullmatch(r"P\d+", token):
                ids.append(self.tag_id(token))
            elif token in self._ids:
                ids.append(self._ids[token])
            elif token.startswith("["):
                raise ValueError(f"unknown instruction {token!r}: the tokenizer knows {self.GEN}")
            else:
                raise ValueError(
                    f"unknown token {token!r} at character {match.start(1)}: not an amino-acid letter "
                    f"({AMINO_ACIDS}) nor a special token ({', '.join(self.vocab[:5])}, {', '.join(self.tags)})"
                )
        return np.array(ids, np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        """The tokens of ``ids`` joined by spaces (ids outside the vocabulary raise ValueError)."""
        out = []
        for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).tolist():
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
            out.append(self.vocab[i])
        return " ".join(out)

    def prompt(self, tag: str | int | None = None) -> np.ndarray:
        """``<bos> [Gen] P<c> Seq=<`` (``tag=None``: the untagged ``<bos> Seq=<``), int32."""
        head = [self.bos_id] if tag is None else [self.bos_id, self.gen_id, self.tag_id(tag)]
        return np.array([*head, self.seq_id], np.int32)

    def record(self, seq: str, tag: str | int | None = None) -> np.ndarray:
        """The prompt, the letters of ``seq`` and ``>``, int32."""
        letters = [self._ids[c] for c in seq if c in AMINO_ACIDS]
        if len(letters) != len(seq):
            _letter_ids(seq)  # raises, naming the bad characters
        return np.concatenate([self.prompt(tag), np.array([*letters, self.eos_id], np.int32)])

    def records(self, seqs: Sequence[str], tags: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """``[N, prompt + L + 1]`` int32 records of equal-length ``seqs`` (``tags=None``: untagged)."""
        tags_N = [None] * len(seqs) if tags is None else [int(t) for t in tags]
        rows = [self.record(s, t) for s, t in zip(seqs, tags_N)]
        if len({len(r) for r in rows}) > 1:
            raise ValueError("records() needs sequences of one length (pad them yourself otherwise)")
        return np.stack(rows)

    def sequence(self, ids: Iterable[int]) -> str:
        """The generated text after the prompt: tokens up to the first ``>`` (or ``<pad>``), letters as they
        are and any other token as `UNKNOWN` (``X``, so `properties` counts it as not valid)."""
        out = []
        for i in np.asarray(ids).tolist():
            if i in (self.eos_id, self.pad_id):
                break
            token = self.vocab[i]
            out.append(token if token in AMINO_ACIDS else UNKNOWN)
        return "".join(out)
