"""Check a built folder: logits against the numpy reference, tokenizer against SentencePiece."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from internlm2_graph.errors import InternLM2GraphError
from internlm2_graph.reference import Reference
from internlm2_graph.runtime import check_model_folder, eos_ids, genai, genai_config, load_model
from internlm2_graph.tokenizer import exact_tokenizer, sentencepiece_encoder
from internlm2_graph.tokenizer import load_model as load_sentencepiece

__all__ = [
    "Agreement",
    "TokenizerVerdict",
    "Verdict",
    "WholePieces",
    "check_model_folder",
    "check_tokenizer",
    "encode_prompt",
    "eos_ids",
    "og_greedy",
    "paragraphs",
    "verify",
    "whole_pieces",
]


def og_greedy(model_dir: str | Path, prompts: list[list[int]], steps: int):
    """Greedy-decode a batch with onnxruntime_genai; the KV-cache path after the prompt.

    Returns (tokens per prompt, logits per step [batch, vocab] as float32): step 0 holds the
    last prompt position's logits, step k the logits after the k-th generated token. Stops early
    when every row has produced an eos id; a finished row is padded with pad ids.
    """
    og = genai()
    model = load_model(model_dir)
    params = og.GeneratorParams(model)
    longest = max(len(p) for p in prompts)
    params.set_search_options(do_sample=False, max_length=longest + steps, batch_size=len(prompts))
    generator = og.Generator(model, params)
    pad = genai_config(model_dir)["model"]["pad_token_id"]
    batch = np.full((len(prompts), longest), pad, dtype=np.int32)
    for row, prompt in enumerate(prompts):
        batch[row, : len(prompt)] = prompt
    generator.append_tokens(batch if len(prompts) > 1 else batch[:, :])
    tokens: list[list[int]] = [[] for _ in prompts]
    history = []
    for _ in range(steps):
        history.append(np.array(generator.get_logits(), dtype=np.float32).reshape(len(prompts), -1))
        generator.generate_next_token()
        for row, token in enumerate(generator.get_next_tokens()):
            tokens[row].append(int(token))
        if generator.is_done():
            break
    history.append(np.array(generator.get_logits(), dtype=np.float32).reshape(len(prompts), -1))
    return tokens, history


def encode_prompt(model_dir: str | Path, text: str) -> list[int]:
    """<s> + the ids of `text`, from the built folder's exact tokenizer (SentencePiece's ids)."""
    return exact_tokenizer(model_dir).encode(text).ids


@dataclass(frozen=True)
class Agreement:
    """How often one tokenizer gave SentencePiece's ids on a text's paragraphs."""

    name: str
    paragraphs: int
    differing: list[int]  # first line of each paragraph whose ids differ
    tokens: int  # SentencePiece's
    differing_tokens: int  # SentencePiece's tokens outside the runs both share
    own_tokens: int

    def __str__(self) -> str:
        agree, tokens = self.paragraphs - len(self.differing), self.tokens - self.differing_tokens
        line = (
            f"{self.name} agrees with SentencePiece on {agree}/{self.paragraphs} paragraphs "
            f"({_percent(agree, self.paragraphs)}) and {tokens}/{self.tokens} tokens "
            f"({_percent(tokens, self.tokens)})"
        )
        if not self.differing:
            return line
        lines = ", ".join(str(n) for n in self.differing[:8])
        more = f" and {len(self.differing) - 8} more" if len(self.differing) > 8 else ""
        return (
            f"{line}\n  paragraphs that differ start on lines {lines}{more} "
            f"({self.name}: {self.own_tokens} tokens in all, SentencePiece: {self.tokens})"
        )


def paragraphs(text: str) -> list[tuple[int, str]]:
    """(line of its first character that is not whitespace, paragraph) for each run of text
    between blank lines."""
    found, start = [], 0
    for blank in [*re.finditer(r"\n(?:[ \t\r\f\v]*\n)+", text), None]:
        end = len(text) if blank is None else blank.start()
        block = text[start:end]
        if block.strip():
            first = start + len(block) - len(block.lstrip())
            found.append((text.count("\n", 0, first) + 1, block))
        start = end if blank is None else blank.end()
    return found


def agreement(
    name: str, encode: Callable[[str], list[int]], reference, blocks: list[tuple[int, str]]
) -> Agreement:
    differing, tokens, differing_tokens, own_tokens = [], 0, 0, 0
    for line, block in blocks:
        expected, got = reference(block), encode(block)
        tokens += len(expected)
        own_tokens += len(got)
        if got != expected:
            differing.append(line)
            matcher = difflib.SequenceMatcher(None, expected, got, autojunk=False)
            shared = sum(size for *_, size in matcher.get_matching_blocks())
            differing_tokens += len(expected) - shared
    return Agreement(name, len(blocks), differing, tokens, differing_tokens, own_tokens)


@dataclass(frozen=True)
class WholePieces:
    """Of the pieces SentencePiece gives as one id for their own text, those og.Tokenizer cuts."""

    pieces: int
    cut: list[str]

    def __str__(self) -> str:
        line = (
            f"og.Tokenizer gives {self.pieces - len(self.cut)}/{self.pieces} pieces of the "
            "vocabulary as one id for their own text, as SentencePiece does"
        )
        if not self.cut:
            return line
        more = f" and {len(self.cut) - 5} more" if len(self.cut) > 5 else ""
        return f"{line}; it cuts {', '.join(repr(t) for t in self.cut[:5])}{more}"


def whole_pieces(model_dir: str | Path, encode, reference) -> WholePieces:
    """Where og.Tokenizer cuts text inside a piece, whatever the text around it: a check of
    the vocabulary against OG_CHUNKS that no corpus can make."""
    pieces, cut = 0, []
    for i, piece in enumerate(load_sentencepiece(Path(model_dir) / "tokenizer.model").pieces):
        text = piece.piece.replace("▁", " ")
        if piece.type != piece.NORMAL or len(text) < 2 or reference(text) != [i]:
            continue
        pieces += 1
        if encode(text) != [i]:
            cut.append(text)
    return WholePieces(pieces, cut)


@dataclass(frozen=True)
class TokenizerVerdict:
    """`verify --text`: og.Tokenizer and the exact path against SentencePiece on a text."""

    runtime: Agreement
    exact: Agreement
    pieces: WholePieces

    @property
    def ok(self) -> bool:
        return not self.exact.differing and not self.runtime.differing

    def __str__(self) -> str:
        lines = [str(self.runtime), str(self.exact), str(self.pieces)]
        if self.exact.differing:
            # The exact path is `tokenizers` on the folder's own files: a difference is a bug.
            lines.append(
                "MISMATCH: exact_tokenizer should always give SentencePiece's ids; please report it"
            )
        elif self.runtime.differing:
            lines.append(
                "MISMATCH: og.Tokenizer differs on these paragraphs; encode with "
                "internlm2_graph.tokenizer.exact_tokenizer(folder) and pass the ids to og"
            )
        else:
            lines.append("OK")
        return "\n".join(lines)


def check_tokenizer(model_dir: str | Path, text: str) -> TokenizerVerdict:
    """og.Tokenizer's and the exact path's ids against SentencePiece's, paragraph by paragraph,
    and the vocabulary's pieces through og.Tokenizer.

    SentencePiece runs on the folder's tokenizer.model with the added tokens (<s>,
    <|im_start|>...) matched whole, as both tokenizers match them.
    """
    og = genai()
    blocks = paragraphs(text)
    if not blocks:
        raise InternLM2GraphError("no text to check: the --text file is empty")
    reference = sentencepiece_encoder(model_dir)
    og_tokenizer = og.Tokenizer(str(model_dir))
    exact = exact_tokenizer(model_dir)

    def runtime(text: str) -> list[int]:
        return [int(i) for i in og_tokenizer.encode(text)]

    def exactly(text: str) -> list[int]:
        return exact.encode(text, add_special_tokens=False).ids

    return TokenizerVerdict(
        agreement("og.Tokenizer", runtime, reference, blocks),
        agreement("exact_tokenizer", exactly, reference, blocks),
        whole_pieces(model_dir, runtime, reference),
    )


def read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InternLM2GraphError(
            f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8"
        ) from error


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


@dataclass(frozen=True)
class Verdict:
    max_logit_error: float
    per_step_error: list[float]
    tokens_agree: int
    steps: int
    model_tokens: list[int]
    reference_tokens: list[int]

    def ok(self, tolerance: float) -> bool:
        """Logits within `tolerance` and the same greedy tokens (both stop at the same eos)."""
        return self.max_logit_error <= tolerance and self.model_tokens == self.reference_tokens

    def __str__(self) -> str:
        steps = len(self.per_step_error)
        lines = [
            f"max |logit difference| {self.max_logit_error:.3g} over {steps} steps",
            f"greedy tokens agree on {self.tokens_agree}/{len(self.reference_tokens)}",
            f"  model:     {self.model_tokens}",
            f"  reference: {self.reference_tokens}",
        ]
        return "\n".join(lines)


def verify(
    model_dir: str | Path, checkpoint: str | Path, prompt: list[int], steps: int = 8
) -> Verdict:
    reference = Reference(checkpoint)
    reference_tokens, reference_logits = reference.greedy(prompt, steps, eos_ids(model_dir))
    (model_tokens,), model_logits = og_greedy(model_dir, [prompt], steps)
    errors = [
        float(np.max(np.abs(m[0].astype(np.float64) - r)))
        for m, r in zip(model_logits, reference_logits)
    ]
    agree = 0
    for m, r in zip(model_tokens, reference_tokens):
        if m != r:
            break
        agree += 1
    return Verdict(max(errors), errors, agree, steps, model_tokens, reference_tokens)
