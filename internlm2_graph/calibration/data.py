"""Calibration data: text (or token ids) -> the token sequences calibration runs on.

A JSON file holding a list of id lists is used as given; any other file is UTF-8 text,
tokenized by the build's prepared tokenizer (tokenizer.PreparedTokenizer.encode: SentencePiece's
ids, from the model the build already read and checked). Without a file: docstrings and code of
this Python's standard library (every install ships them). Bad data fails here, before a build
writes anything.
"""

from __future__ import annotations

import ast
import functools
import json
import sysconfig
from collections.abc import Callable
from pathlib import Path

import numpy as np

from internlm2_graph.config import InternLM2Config
from internlm2_graph.errors import InternLM2GraphError

# Calibration text is cut into sequences of this many tokens (<s> first).
SEQUENCE_TOKENS = 512
# A tokenizer: text -> ids, without <s>.
Encode = Callable[[str], list[int]]


def calibration_tokens(
    option: str | None,
    encode: Encode,
    config: InternLM2Config,
    max_tokens: int,
) -> list[np.ndarray]:
    """The calibration sequences (int64 ids, <s> first) for `calibration_data=option`, at most
    `max_tokens` in all (a recipe's `tokens`).

    A JSON file holding a list of id lists is used as given (sequences longer than
    SEQUENCE_TOKENS are cut); any other file is UTF-8 text, tokenized by `encode`. Without the
    option: default_text().
    """
    if option is None:
        return chop(_encoded(encode, default_text()), config, max_tokens)
    path = Path(option).expanduser()
    where = f"--extra_options calibration_data={option}"
    if not path.is_file():
        raise InternLM2GraphError(
            f"{where}: no such file; give a UTF-8 text file or a JSON list of token-id lists"
        )
    raw = path.read_bytes()
    if not raw.strip():
        raise InternLM2GraphError(
            f"{where}: the file is empty; give a few thousand tokens of text like your prompts"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InternLM2GraphError(
            f"{where}: not UTF-8 text (byte {err.start}); save it as UTF-8 or pass a JSON list "
            "of token-id lists"
        ) from None
    if path.suffix.lower() == ".json" or text.lstrip().startswith("[["):
        return _id_lists(text, where, config, max_tokens)
    ids = _encoded(encode, text)
    if len(ids) < 2:
        raise InternLM2GraphError(f"{where}: the text gives fewer than 2 tokens; give more text")
    return chop(ids, config, max_tokens)


def first_tokens(sequences: list[np.ndarray], count: int) -> list[np.ndarray]:
    """The first sequences, up to `count` tokens in all (at least one sequence)."""
    chosen, total = [], 0
    for sequence in sequences:
        if chosen and total + len(sequence) > count:
            break
        chosen.append(sequence)
        total += len(sequence)
    return chosen


def chop(ids: np.ndarray, config: InternLM2Config, max_tokens: int) -> list[np.ndarray]:
    """<s> + pieces of the stream, SEQUENCE_TOKENS each, max_tokens in all, taken evenly
    spaced from the whole stream (the whole text is sampled, not only its beginning)."""
    if (bad := _outside_vocabulary(ids, config)) is not None:
        raise InternLM2GraphError(
            f"calibration_data: the tokenizer gives id {bad}, outside the model's "
            f"vocabulary (0..{config.vocab_size - 1}); the tokenizer and weights disagree"
        )
    length = sequence_tokens(config)
    starts = range(0, len(ids), length - 1)
    keep = max(1, max_tokens // length)
    if len(starts) > keep:
        starts = [starts[i] for i in np.linspace(0, len(starts) - 1, keep).round().astype(int)]
    return [
        np.concatenate([[config.bos_token_id], ids[start : start + length - 1]]).astype(np.int64)
        for start in starts
    ]


def sequence_tokens(config: InternLM2Config) -> int:
    """Tokens per calibration sequence: SEQUENCE_TOKENS, or the model's context if shorter."""
    return min(SEQUENCE_TOKENS, config.max_position_embeddings)


@functools.lru_cache(maxsize=1)
def default_text(per_module: int = 3000) -> str:
    """Prose and code that every Python install ships: for each module of the standard library
    (in name order), its docstrings (the module's, then its classes' and functions') up to half
    of `per_module` characters, then its source from the first class or function on, about
    `per_module` characters in all. English technical prose and Python code, about half each
    (module docstrings alone made it a fifth prose, and prose was where int4 lost most), from
    some two hundred modules; the same Python version gives the same text, hence the same build.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    for path in sorted(stdlib.glob("*.py")):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        doc = docstrings(tree)
        first = next((n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))), None)
        code = "" if first is None else "\n".join(source.splitlines()[first.lineno - 1 :])
        text = (doc[: per_module // 2] + "\n\n" + code)[:per_module].strip()
        if len(text) > 200:
            parts.append(text)
    if sum(map(len, parts)) < 50_000:
        raise InternLM2GraphError(
            "calibration_data: this Python install ships no standard library sources to "
            "calibrate on; pass calibration_data=PATH (text like your prompts)"
        )
    return "\n\n".join(parts)


def docstrings(tree: ast.Module) -> str:
    """The module's docstring, then those of its classes and functions (ast.walk's order)."""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds))
    return "\n\n".join(d for d in docs if d)


def _encoded(encode: Encode, text: str) -> np.ndarray:
    return np.asarray(encode(text), dtype=np.int64)


def _id_lists(text: str, where: str, config: InternLM2Config, max_tokens: int) -> list:
    try:
        lists = json.loads(text)
    except ValueError as err:
        raise InternLM2GraphError(f"{where}: not valid JSON ({err})") from None
    ok = (
        isinstance(lists, list)
        and lists
        and all(isinstance(s, list) and s for s in lists)
        and all(isinstance(i, int) and not isinstance(i, bool) for s in lists for i in s)
    )
    if not ok:
        raise InternLM2GraphError(
            f"{where}: expected a JSON list of non-empty lists of token ids, e.g. [[1, 422, 9]]"
        )
    sequences, total = [], 0
    for row, seq in enumerate(lists):
        ids = np.asarray(seq, dtype=np.int64)
        if (bad := _outside_vocabulary(ids, config)) is not None:
            raise InternLM2GraphError(
                f"{where}: id {bad} in list {row} is outside the vocabulary "
                f"(0..{config.vocab_size - 1}); tokenize with this checkpoint's tokenizer"
            )
        length = sequence_tokens(config)
        for start in range(0, len(ids), length):
            part = ids[start : start + length][: max_tokens - total]
            if len(part):
                sequences.append(part)
                total += len(part)
    return sequences


def _outside_vocabulary(ids: np.ndarray, config: InternLM2Config) -> int | None:
    """The first id without an embedding row, or None."""
    bad = (ids < 0) | (ids >= config.vocab_size)
    return int(ids[bad][0]) if bad.any() else None
