"""Per-tensor weight formats: the grammar of `lm_head_precision`, `embedding_precision` and
`tensor_precision`, and the rules that say which linear layer gets which format.

A FORMAT is `float`, or `int4`/`int8` with optional parts: `-bN` (block size N) and
`-sym`/`-asym`; parts left out come from the body's options (`int8` with block_size=32 and
is_symmetric=true is `int8-b32-sym`). `tensor_precision` is a comma-separated list of
`NAME[@LAYERS]:FORMAT`, NAME a decoder linear as the checkpoint names it (`attention.wqkv`,
`attention.wo`, `feed_forward.w1`, `feed_forward.w2`, `feed_forward.w3`), LAYERS `+`-joined
layer numbers, ranges and `firstN`/`lastN` (`0-2+last3`), all layers without it. A later rule
wins over an earlier one for the layers both name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from internlm2_graph.errors import InternLM2GraphError

LINEARS = (
    "attention.wqkv",
    "attention.wo",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
)
_FORMAT = re.compile(r"^(int4|int8)(?:-b(\d+))?(?:-(sym|asym))?$")
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def parse_format(text: str, base, option: str):
    """A QuantSpec for FORMAT `text` (None for float), missing parts taken from `base`."""
    if text == "float":
        return None
    match = _FORMAT.match(text)
    if match is None:
        raise InternLM2GraphError(
            f"--extra_options {option}: {text!r} is not a weight format; use float, int4 or "
            "int8, optionally with -bBLOCK and -sym/-asym (e.g. int8, int4-b16-asym)"
        )
    bits, block, symmetry = match.groups()
    return replace(
        base,
        bits=int(bits[3:]),
        block_size=int(block) if block else base.block_size,
        symmetric=base.symmetric if symmetry is None else symmetry == "sym",
    )


def format_name(spec) -> str:
    """The FORMAT string of a QuantSpec (or None): what `inspect` prints."""
    if spec is None:
        return "float"
    return f"int{spec.bits}-b{spec.block_size}-{'sym' if spec.symmetric else 'asym'}"


@dataclass(frozen=True)
class TensorRule:
    """Linear `name` of the layers `select` picks (None: every layer) is stored as `spec`.

    `select` holds (first, last) ranges; a negative number counts from the end (-1 is the last
    layer), so a rule can name "the first and last four" of any depth. `layers` is the set
    those pick once the model's depth is known (`bound`)."""

    name: str
    select: tuple[tuple[int, int], ...] | None
    spec: object  # QuantSpec | None (float)
    layers: frozenset[int] | None = None

    def bound(self, total: int) -> TensorRule:
        """The rule for a model of `total` layers; refuses layers the model does not have."""
        if self.select is None:
            return self
        chosen: set[int] = set()
        for first, last in self.select:
            lo, hi = (n + total if n < 0 else n for n in (first, last))
            if not 0 <= lo <= hi < total:
                raise InternLM2GraphError(
                    f"--extra_options tensor_precision: {self.name} names layers beyond the "
                    f"model's {total} (0..{total - 1})"
                )
            chosen.update(range(lo, hi + 1))
        return replace(self, layers=frozenset(chosen))

    def matches(self, path: str) -> bool:
        """Whether the linear at checkpoint path `path` (model.layers.3.attention.wo) is named."""
        match = _LAYER_NAME.match(path)
        if match is None or match.group(2) != self.name:
            return False
        if self.select is None:
            return True
        if self.layers is None:
            raise InternLM2GraphError(f"tensor_precision rule for {self.name} is not bound")
        return int(match.group(1)) in self.layers


def parse_rules(text: str, base) -> tuple[TensorRule, ...]:
    """`tensor_precision`'s value as rules, in the order given."""
    rules = []
    for item in text.split(","):
        target, sep, fmt = item.strip().partition(":")
        name, _, layers = target.partition("@")
        if not sep or name not in LINEARS:
            raise InternLM2GraphError(
                f"--extra_options tensor_precision: {item!r} is not NAME[@LAYERS]:FORMAT with "
                f"NAME one of {', '.join(LINEARS)} (e.g. feed_forward.w2@0-3:int8)"
            )
        spec = parse_format(fmt, base, f"tensor_precision {item!r}")
        if spec is None:  # GPTQ/GPTAQ quantize every decoder linear in one pass
            raise InternLM2GraphError(
                f"--extra_options tensor_precision: {item!r}: decoder linears are int4 or int8 "
                "(float is for lm_head_precision and embedding_precision)"
            )
        rules.append(TensorRule(name, _selector(layers, item) if layers else None, spec))
    return tuple(rules)


_PART = re.compile(r"^(?:(\d+)(?:-(\d+))?|first(\d+)|last(\d+))$")


def _selector(text: str, item: str) -> tuple[tuple[int, int], ...]:
    """LAYERS: `+`-joined parts N, N-M, firstN, lastN -> (first, last) ranges."""
    ranges = []
    for part in text.split("+"):
        match = _PART.match(part)
        if match is None or any(g == "0" for g in match.groups()[2:]):
            raise InternLM2GraphError(
                f"--extra_options tensor_precision: {item!r}: LAYERS are N, N-M, firstN or "
                "lastN joined by + (e.g. 0-2+last3)"
            )
        lo, hi, first, last = match.groups()
        if first:
            ranges.append((0, int(first) - 1))
        elif last:
            ranges.append((-int(last), -1))
        elif hi is not None and int(hi) < int(lo):
            raise InternLM2GraphError(
                f"--extra_options tensor_precision: {item!r}: range {part} runs backwards"
            )
        else:
            ranges.append((int(lo), int(hi if hi is not None else lo)))
    return tuple(ranges)
