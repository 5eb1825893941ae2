"""Speculative decoding: the genai_config `speculative` section and an optional draft model.

onnxruntime-genai 0.18 verifies several proposed tokens in one target pass and keeps the longest
prefix greedy decoding would have produced, so greedy output is unchanged; only speed moves.
Proposals come from one of two places (microsoft/onnxruntime-genai, src/decoding_strategy.cpp,
MakeDecodingStrategy; the installed 0.18 was checked by running it, see tests/test_speculative.py):
- n-gram lookup: `speculative.ngram_size` > 0 matches the last n-1 tokens against the prompt
  and the reply so far; no second model (src/n_gram_decoding_strategy.cpp);
- a draft model: `model.draft`, a decoder block with the same fields as `model.decoder`
  (src/config.h). It takes precedence, and n-gram plus draft is refused by the runtime.
The draft of a folder lives in its `draft/` subfolder, itself a complete model folder, so the
`model.draft` block can always be rebuilt from `draft/genai_config.json` (switching a draft off
and on again at run time needs nothing else).
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from internlm2_graph.errors import InternLM2GraphError

MODES = ("off", "ngram", "draft")
DRAFT_DIR = "draft"
# onnxruntime-genai 0.18 fills the decoder's provider list from genai_config's provider_options
# but not the draft's, so its same-provider check fails for every pair but CPU + CPU (measured
# on an H200: benchmarks/probes/speculative_draft_probe.py; later og versions fill both).
DRAFT_PROVIDERS = ("cpu",)
DRAFT_PRECISIONS = ("int4", "int8")
# og 0.18 validates K and n within [1, 16] and [2, 16] (src/config.cpp, Speculative_Element).
MAX_K = 16
# Chosen by benchmarks/speculative.py on SmolLM2-135M, CPU (README, "Speculative decoding"):
# n=4 proposes less often than n=3 but is right more often (acceptance 0.63-0.92 vs 0.38-0.88),
# so free writing stops paying for rejected proposals (0.90x -> 1.05x) and copying keeps its gain.
# og's adaptive width (min_adaptive_k) and cooldown lost on copying and gained nothing on free
# writing there, so neither is on by default.
NGRAM_SIZE = 4
MAX_DRAFT_TOKENS = 6
# Per round with a draft model (og's own default is 4): with SmolLM2's int4 self-draft on the
# CPU, 2 was as fast as 4 on copying and faster on free writing, in both runs measured.
DRAFT_TOKENS = 2

OPTIONS = {
    "speculative": "off, ngram or draft: write genai_config's speculative section (default off)",
    "ngram_size": f"n-gram lookup: match the last n-1 tokens, 2..16 (default {NGRAM_SIZE})",
    "max_draft_tokens": f"tokens proposed per step, 1..16 (default {MAX_DRAFT_TOKENS} for ngram, "
    f"{DRAFT_TOKENS} for a draft)",
    "min_adaptive_k": "0 (fixed max_draft_tokens) or 1..16: og adapts the proposal width, "
    "starting there (default 0)",
    "draft": "int4/int8 (a quantized copy of this checkpoint) or a built folder with the same "
    "vocabulary: the draft model (implies speculative=draft; default int4)",
}


@dataclass(frozen=True)
class Speculative:
    """What the folder's genai_config asks of og's speculative decoding."""

    mode: str = "off"
    ngram_size: int = NGRAM_SIZE
    max_draft_tokens: int = MAX_DRAFT_TOKENS
    min_adaptive_k: int = 0
    draft: str | None = None  # a precision in DRAFT_PRECISIONS, or a built folder

    @property
    def draft_folder(self) -> Path | None:
        if self.mode != "draft" or self.draft in DRAFT_PRECISIONS:
            return None
        return Path(self.draft)

    def section(self) -> dict | None:
        """genai_config's `speculative` section; None when off."""
        if self.mode == "off":
            return None
        settings = {"max_draft_tokens": self.max_draft_tokens}
        if self.mode == "ngram":
            settings["ngram_size"] = self.ngram_size
        if self.min_adaptive_k:
            settings["min_adaptive_k"] = self.min_adaptive_k
        return settings


def split_options(options: dict[str, str]) -> tuple[Speculative, dict[str, str]]:
    """(the speculative settings, the remaining options for precision.resolve_target)."""
    mine = {k: str(v) for k, v in options.items() if k in OPTIONS}
    rest = {k: v for k, v in options.items() if k not in OPTIONS}
    mode = mine.get("speculative", "draft" if "draft" in mine else "off").strip().lower()
    if mode not in MODES:
        raise InternLM2GraphError(
            f"--extra_options speculative={mine['speculative']!r}: use one of {', '.join(MODES)}"
        )
    if mode == "off" and len(mine) > ("speculative" in mine):
        extra = ", ".join(sorted(set(mine) - {"speculative"}))
        raise InternLM2GraphError(
            f"--extra_options {extra} need speculative=ngram or speculative=draft"
        )
    if "ngram_size" in mine and mode != "ngram":
        raise InternLM2GraphError("--extra_options ngram_size only applies to speculative=ngram")
    if "draft" in mine and mode != "draft":
        raise InternLM2GraphError(
            "--extra_options draft=... uses a draft model: drop speculative=ngram (og 0.18 runs "
            "one or the other)"
        )
    default_k = MAX_DRAFT_TOKENS if mode == "ngram" else DRAFT_TOKENS
    spec = Speculative(
        mode=mode,
        ngram_size=_in_range(mine, "ngram_size", NGRAM_SIZE, 2),
        max_draft_tokens=_in_range(mine, "max_draft_tokens", default_k, 1),
        min_adaptive_k=_in_range(mine, "min_adaptive_k", 0, 0),
        draft=mine.get("draft", "int4") if mode == "draft" else None,
    )
    if spec.draft_folder is not None:
        check_draft_folder(spec.draft_folder)
    return spec, rest


def _in_range(options: dict[str, str], key: str, default: int, low: int) -> int:
    if key not in options:
        return default
    try:
        value = int(options[key])
    except ValueError:
        value = -1
    if not low <= value <= MAX_K:
        raise InternLM2GraphError(
            f"--extra_options {key}={options[key]!r}: expected a whole number {low}..{MAX_K}"
        )
    return value


# --- the draft model ------------------------------------------------------------------------


def check_draft_folder(folder: Path) -> dict:
    """A built model folder's genai_config, or a one-line error naming what to pass instead."""
    config_path = Path(folder) / "genai_config.json"
    if not config_path.is_file():
        raise InternLM2GraphError(
            f"--extra_options draft={folder}: not int4/int8 and not a built model folder (no "
            "genai_config.json); pass draft=int4 or the folder of a built model"
        )
    genai = json.loads(config_path.read_text(encoding="utf-8"))
    if "draft" in genai["model"]:
        raise InternLM2GraphError(
            f"--extra_options draft={folder}: that folder has a draft of its own; pass a folder "
            "built without one"
        )
    return genai


def check_provider(spec: Speculative, provider: str) -> None:
    """Refuse a draft where onnxruntime-genai cannot load one."""
    if spec.mode == "draft" and provider not in DRAFT_PROVIDERS:
        raise InternLM2GraphError(
            f"--extra_options speculative=draft with -e {provider}: onnxruntime-genai 0.18 "
            "loads a draft model on the CPU only (elsewhere it fails 'Target and draft must "
            "use the same execution provider'); build target and draft with -e cpu"
        )


def check_draft(spec: Speculative, vocab: dict[str, int], vocab_size: int, provider: str) -> None:
    """Refuse a draft folder whose token ids mean other text, or that runs on another device.

    `vocab` is the target's tokenizer vocabulary (token -> id, added tokens included),
    `vocab_size` its embedding rows; the draft must have both the same.
    """
    draft_folder = spec.draft_folder
    if draft_folder is None:
        return
    draft_genai = check_draft_folder(draft_folder)
    theirs = draft_genai["model"]["vocab_size"]
    if theirs != vocab_size or folder_vocab(draft_folder) != vocab:
        what = f"{theirs} vs {vocab_size} ids" if theirs != vocab_size else "tokenizer.json"
        raise InternLM2GraphError(
            f"--extra_options draft={draft_folder}: its vocabulary differs from this checkpoint's "
            f"({what}); a draft must share the tokenizer (e.g. InternLM2 1.8B for 7B/20B)"
        )
    their_provider = provider_of(draft_genai["model"]["decoder"])
    if their_provider != provider:
        raise InternLM2GraphError(
            f"--extra_options draft={draft_folder}: built for {their_provider}, the target for "
            f"{provider}; rebuild the draft with -e {provider}"
        )


def folder_vocab(folder: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise InternLM2GraphError(
            f"--extra_options draft={folder}: no tokenizer.json there; pass a built model folder"
        )
    return Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)


def provider_of(decoder: dict) -> str:
    providers = decoder.get("session_options", {}).get("provider_options", [])
    return next((name for entry in providers for name in entry), "cpu")


def copy_draft(source: Path, dest: Path) -> None:
    """The draft folder's files into `dest` (hard links where the filesystem allows)."""
    dest.mkdir()
    for path in Path(source).iterdir():
        if path.is_file():
            try:
                (dest / path.name).hardlink_to(path)
            except OSError:
                shutil.copy2(path, dest / path.name)


def draft_block(folder: Path) -> dict:
    """genai_config's `model.draft`: the draft folder's decoder, its file named from the parent."""
    genai = json.loads((Path(folder) / DRAFT_DIR / "genai_config.json").read_text("utf-8"))
    block = copy.deepcopy(genai["model"]["decoder"])
    block["filename"] = f"{DRAFT_DIR}/{block['filename']}"
    return block


def with_speculative(genai: dict, spec: Speculative, folder: Path) -> dict:
    """`genai` (a genai_config dict) set up for `spec`; the draft, if any, is in folder/draft."""
    genai = copy.deepcopy(genai)
    genai["model"].pop("draft", None)
    genai.pop("speculative", None)
    if spec.mode == "draft":
        genai["model"]["draft"] = draft_block(folder)
    section = spec.section()
    if section is not None:
        genai["speculative"] = section
    return genai


# --- at run time ----------------------------------------------------------------------------


def preset(mode: str, folder: str | Path | None = None) -> Speculative:
    """The settings `chat --speculative MODE` means: this module's measured defaults."""
    if mode not in MODES:
        raise InternLM2GraphError(f"--speculative {mode!r}: use one of {', '.join(MODES)}")
    if mode == "draft" and folder is not None and not (Path(folder) / DRAFT_DIR).is_dir():
        raise InternLM2GraphError(
            f"--speculative draft: {folder} has no draft; build it with --extra_options "
            "speculative=draft (or draft=FOLDER)"
        )
    k = DRAFT_TOKENS if mode == "draft" else MAX_DRAFT_TOKENS
    return Speculative(mode=mode, max_draft_tokens=k)


def set_speculative(folder: str | Path, spec: Speculative | str) -> None:
    """Rewrite a built folder's genai_config for `spec` (a Speculative or a preset name)."""
    folder = Path(folder)
    spec = preset(spec, folder) if isinstance(spec, str) else spec
    path = folder / "genai_config.json"
    genai = with_speculative(json.loads(path.read_text("utf-8")), spec, folder)
    path.write_text(json.dumps(genai, indent=4) + "\n", encoding="utf-8")
