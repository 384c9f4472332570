"""Matrix products in HLO text, and which of them are weight gradients.

A factored LoRA step must never form a full-size weight gradient ``dW = xᵀ dy``. In the compiled HLO
such a gradient is a matrix product whose output has a weight's shape *and* whose contraction runs
over the tokens: for ``x: [T, in]`` and ``dy: [T, out]`` it is ``[in, out]`` contracting ``T``. A
product with the same output shape that contracts over the rank, ``A @ B: [in, r] x [r, out]``, as a
merged-weight custom VJP or DoRA's weight norm forms, is not one. Telling the two apart needs the
operand shapes, which XLA's text does not print at the ``dot`` (``dot(%a, %b)``); they are looked up
by name among the instructions of the same computation (names are local to a computation; inside a
fused computation the operands are ``parameter(N)`` instructions, which carry their shapes).

Shapes, for one product::

    out_shape   the product's output shape (batch dims, then lhs free dims, then rhs free dims)
    lhs_shape   the left operand's shape
    rhs_shape   the right operand's shape
    contracted  the product of the sizes of the lhs contracting dims (1 when there are none)

Read: ``dot(%a, %b)`` and ``dot(f32[10,12]{1,0} %a, f32[12,20]{1,0} %b)`` (operand shapes printed
inline), names with or without ``%``, batch dims, any element type (``f32``, ``bf16``, ...), layouts
with tiles, instructions inside fused computations, and library GEMM custom-calls that carry XLA's
``dot_dimension_numbers`` in their ``backend_config`` (GPU's ``__cublas$gemm`` /
``__cublas$lt$matmul``; read from the documented format, not checked on a GPU here). A product
whose operands cannot be resolved, or a ``dot(`` or GEMM custom-call that cannot be read, raises
``ValueError``: a change of XLA's text format must not make a check pass silently.

Example (``x @ W`` differentiated with respect to ``W``; ``x @ (A @ B)`` forms a weight-shaped
product that contracts over the rank only)::

    >>> import jax, jax.numpy as jnp
    >>> from lorajax import hlo
    >>> x, w = jnp.ones((10, 12)), jnp.ones((12, 20))
    >>> text = jax.jit(jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w)))).lower(w).compile().as_text()
    >>> [(p.out_shape, p.contracted) for p in hlo.weight_gradients(text, {(12, 20)}, tokens=10)]
    [((12, 20), 10)]
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Iterator, NamedTuple

__all__ = ["Product", "dot_products", "weight_gradients", "count_weight_gradients"]


class Product(NamedTuple):
    """One matrix product (``dot`` or GEMM custom-call) of an HLO module."""

    out_shape: tuple[int, ...]
    lhs_shape: tuple[int, ...]
    rhs_shape: tuple[int, ...]
    contracted: int
    line: str


Shape = tuple[int, ...]

_ARRAY = re.compile(r"(\w+)\[([^\]]*)\]")
_NAME_EQ = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=(),]+)\s*=\s*")
_OPCODE = re.compile(r"\s*([\w\-]+)\(")
_OPERAND = re.compile(r"^(?:(\w+\[[^\]]*\])(?:\{[^}]*\})?\s+)?%?(\S+)$")
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_GEMM_TARGET = re.compile(r"gemm|matmul", re.IGNORECASE)
_DOT_MENTION = re.compile(r"(?:^|[\s}=])dot\(")
_OPEN, _CLOSE = "([{", ")]}"


def _dims(text: str) -> Shape:
    """``"10,12"`` -> (10, 12); bounded dynamic dims (``<=10``) read as their bound."""
    return tuple(int(d.strip().lstrip("<=")) for d in text.split(",") if d.strip())


def _brackets(text: str) -> Iterator[tuple[int, str, int]]:
    """``(index, char, depth after it)`` for every character outside quoted strings (escapes honoured)."""
    depth, quoted, escaped = 0, False, False
    for i, c in enumerate(text):
        if quoted:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                quoted = False
            continue
        if c == '"':
            quoted = True
            continue
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
        yield i, c, depth


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at ``text[start]``, skipping quoted strings."""
    for i, c, depth in _brackets(text[start:]):
        if c in _CLOSE and depth == 0:
            return start + i + 1
    raise ValueError(f"unbalanced brackets in HLO text: {text.strip()[:200]}")


def _split_top(text: str) -> list[str]:
    """Split on the commas that are not inside brackets or quotes."""
    cuts = [i for i, c, depth in _brackets(text) if c == "," and depth == 0]
    parts = [text[a + 1 : b].strip() for a, b in zip([-1, *cuts], [*cuts, len(text)])]
    return parts if parts[-1] else parts[:-1]


def _depth(line: str) -> int:
    """Open minus closed brackets on a line, outside quoted strings."""
    if '"' not in line:
        return sum(map(line.count, _OPEN)) - sum(map(line.count, _CLOSE))
    depth = 0
    for _, _, depth in _brackets(line):
        pass
    return depth


class _Instr(NamedTuple):
    name: str
    shapes: list[Shape]  # one shape for an array, the elements' shapes for a tuple
    opcode: str
    operands: list[str]
    attrs: str
    line: str


def _parse_instruction(line: str) -> _Instr | None:
    m = _NAME_EQ.match(line)
    if m is None:
        return None
    i = m.end()
    if line[i : i + 1] == "(":  # tuple shape
        j = _balanced(line, i)
        shapes = [_dims(d) for _, d in _ARRAY.findall(line[i:j])]
    else:
        a = _ARRAY.match(line, i)
        if a is None:
            return None
        shapes, j = [_dims(a.group(2))], a.end()
        if line[j : j + 1] == "{":  # layout
            j = _balanced(line, j)
    op = _OPCODE.match(line, j)
    if op is None:
        return None
    k = _balanced(line, op.end() - 1)
    return _Instr(m.group(1), shapes, op.group(1), _split_top(line[op.end() : k - 1]), line[k:], line.strip())


def _is_header(line: str) -> bool:
    """A computation's opening line: ``[ENTRY ]%name (params) -> shape {`` or ``name {``."""
    return line.rstrip().endswith("{") and "=" not in line.split("(")[0]


def _computations(text: str) -> Iterable[list[str]]:
    """The instruction lines of each computation; an instruction spread over several lines (open brackets or a
    trailing comma at the end of a line, as in hand-written HLO) is joined into one."""
    body: list[str] = []
    pending = ""
    for raw in text.splitlines():
        if pending:
            pending += " " + raw.strip()
            if _depth(pending) <= 0 and not pending.rstrip().endswith(","):
                body.append(pending)
                pending = ""
            continue
        if _is_header(raw):
            if body:
                yield body
            body = []
        elif (
            raw.rstrip()[-1:] not in (")", "}")
            and _NAME_EQ.match(raw)
            and (_depth(raw) > 0 or raw.rstrip()[-1:] == ",")
        ):
            pending = raw
        else:
            body.append(raw)
    if pending:
        body.append(pending)
    if body:
        yield body


def _dim_list(attrs: str, key: str) -> list[int] | None:
    """``key={1,2}`` in HLO attributes, or ``"key":["1","2"]`` in a JSON backend config."""
    m = re.search(rf"\b{key}=\{{([^}}]*)\}}", attrs) or re.search(rf'"{key}"\s*:\s*\[([^\]]*)\]', attrs)
    if m is None:
        return None
    return [int(v.strip().strip('"')) for v in m.group(1).split(",") if v.strip()]


def _operand_shape(operand: str, local: dict[str, Shape], line: str) -> Shape:
    m = _OPERAND.match(operand)
    if m is None:
        raise ValueError(f"cannot read the operand {operand!r} of this HLO product (format changed?): {line}")
    if m.group(1):
        return _dims(m.group(1).split("[", 1)[1].rstrip("]"))
    if m.group(2) not in local:
        raise ValueError(f"cannot find the shape of {m.group(2)} in its HLO computation (format changed?): {line}")
    return local[m.group(2)]


def dot_products(hlo_text: str) -> list[Product]:
    """Every matrix product of an HLO module, fused computations included, with its operand shapes.

    ``hlo_text``: a module as XLA prints it, e.g. ``jax.jit(f).lower(*args).compile().as_text()``
    (after optimisation: what runs) or ``.lower(*args).as_text(dialect="hlo")`` (before it).
    """
    out = []
    for body in _computations(hlo_text):
        instrs = []
        for line in body:
            ins = _parse_instruction(line)
            if ins is None:
                if _DOT_MENTION.search(line.split("metadata=")[0]):
                    raise ValueError(f"cannot read this HLO dot (format changed?): {line.strip()}")
                continue
            instrs.append(ins)
        local = {ins.name: ins.shapes[0] for ins in instrs if len(ins.shapes) == 1}
        for ins in instrs:
            if ins.opcode == "dot":
                pass
            elif ins.opcode == "custom-call":
                target = _TARGET.search(ins.attrs)
                if target is None or not _GEMM_TARGET.search(target.group(1)):
                    continue
            else:
                continue
            if len(ins.operands) < 2 or not ins.shapes:
                raise ValueError(f"cannot read the operands of this HLO product (format changed?): {ins.line}")
            lhs = _operand_shape(ins.operands[0], local, ins.line)
            rhs = _operand_shape(ins.operands[1], local, ins.line)
            contracting = _dim_list(ins.attrs, "lhs_contracting_dims")
            if contracting is None:
                contracting = _dim_list(ins.attrs, "lhs_contracting_dimensions")
            if contracting is None:
                if ins.opcode == "custom-call":
                    raise ValueError(f"no dot_dimension_numbers in this GEMM custom-call: {ins.line}")
                contracting = []  # an outer product: HLO may leave the empty list out
            if any(d >= len(lhs) for d in contracting):
                raise ValueError(f"contracting dims {contracting} do not fit the lhs shape {lhs}: {ins.line}")
            out.append(Product(ins.shapes[0], lhs, rhs, math.prod(lhs[d] for d in contracting), ins.line))
    return out


def weight_gradients(hlo_text: str, weight_shapes: Iterable[Shape], tokens: int) -> list[Product]:
    """The products that have a weight's shape and contract over at least ``tokens`` elements.

    ``weight_shapes``: every shape a weight gradient could take, e.g. ``{W.shape, W.shape[::-1]}``
    for each frozen ``W`` (orientations are not added here). ``tokens``: the number of tokens of the
    step's input (a weight gradient ``xᵀ dy`` contracts over all of them); pick shapes whose dims
    differ from it, and note that a weight-shaped activation product contracting over a feature dim
    of at least ``tokens`` would also be counted.
    """
    shapes = {tuple(s) for s in weight_shapes}
    return [p for p in dot_products(hlo_text) if p.out_shape in shapes and p.contracted >= tokens]


def count_weight_gradients(hlo_text: str, weight_shapes: Iterable[Shape], tokens: int) -> tuple[int, int]:
    """(weight gradients as in :func:`weight_gradients`, products with a weight's shape in all)."""
    shapes = {tuple(s) for s in weight_shapes}
    shaped = [p for p in dot_products(hlo_text) if p.out_shape in shapes]
    return sum(p.contracted >= tokens for p in shaped), len(shaped)
