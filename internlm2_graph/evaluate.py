"""Teacher-forced quality of built folders: perplexity, and KL / top-1 agreement to a reference.

`internlm2-graph eval FOLDER --text FILE [--reference FOLDER]` runs it on your own folders and
text; the benchmarks' quality suite calls the same functions.

Logits come from onnxruntime running the folder's decoder graph directly (an InferenceSession on
the model file genai_config names), because that gives the logits of every position of a
window in one call; og's Generator only exposes the last position's. Works for our folders and
the onnxruntime-genai builder's (position_ids, if the graph has it, is fed too).

Text is cut into consecutive windows of `window` tokens, each evaluated from an empty KV cache;
position t predicts token t+1 inside its window, so a window of W tokens scores W-1 of them.
With `chunk`, each window is fed `chunk` tokens at a time with the KV cache carried between
calls, so a quantized or otherwise modified cache is actually read (with the whole window in
one call, attention may never read the cache back).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from internlm2_graph.errors import InternLM2GraphError

PROVIDERS = {"cuda": "CUDAExecutionProvider", "dml": "DmlExecutionProvider"}
TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int8)": np.int8,  # quantized KV caches
    "tensor(uint8)": np.uint8,  # int4 ones, two codes a byte
}
ROWS = 256  # positions per block when turning logits into log-probabilities (bounds memory)


class Decoder:
    """A built folder's decoder graph, run with an explicit KV cache."""

    def __init__(self, model_dir: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        model_dir = Path(model_dir)
        genai = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(model_dir / genai["filename"]), options, providers=_providers(genai)
        )
        names = genai.get("inputs", {})
        self.past_keys = names.get("past_key_names", "past_key_values.%d.key")
        self.past_values = names.get("past_value_names", "past_key_values.%d.value")
        outputs = genai.get("outputs", {})
        self.present_keys = outputs.get("present_key_names", "present.%d.key")
        self.present_values = outputs.get("present_value_names", "present.%d.value")
        self.layers = genai["num_hidden_layers"]
        self.kv_shape = (genai["num_key_value_heads"], genai["head_size"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}

    def logits(self, ids: np.ndarray, chunk: int | None = None) -> np.ndarray:
        """float32 logits [len(ids), vocab] of one sequence, fed `chunk` tokens per call."""
        ids = np.asarray(ids, dtype=np.int64)
        chunk = chunk or len(ids)
        past = {name: self._empty(name) for name in self._past_names()}
        out = []
        for start in range(0, len(ids), chunk):
            piece = ids[start : start + chunk]
            total = start + len(piece)
            feeds = {"input_ids": piece[None], "attention_mask": np.ones((1, total), np.int64)}
            if "position_ids" in self.inputs:
                feeds["position_ids"] = np.arange(start, total, dtype=np.int64)[None]
            feeds |= past
            wanted = ["logits", *self._present_names()]
            logits, *presents = self.session.run(wanted, feeds)
            out.append(logits[0].astype(np.float32))
            past = dict(zip(self._past_names(), presents))
        return np.concatenate(out)

    def _past_names(self) -> list[str]:
        return [n % i for i in range(self.layers) for n in (self.past_keys, self.past_values)]

    def _present_names(self) -> list[str]:
        return [n % i for i in range(self.layers) for n in (self.present_keys, self.present_values)]

    def _empty(self, name: str) -> np.ndarray:
        # The input's own last dimension: a packed int4 cache holds head_size / 2 bytes.
        size = self.inputs[name].shape[-1]
        size = size if isinstance(size, int) else self.kv_shape[1]
        return np.zeros((1, self.kv_shape[0], 0, size), TYPES[self.inputs[name].type])


def _providers(genai: dict) -> list[str]:
    options = genai.get("session_options", {}).get("provider_options", [])
    chosen = [PROVIDERS[name] for entry in options for name in entry if name in PROVIDERS]
    return [*chosen, "CPUExecutionProvider"]


def windows(n: int, window: int) -> Iterator[slice]:
    """Consecutive windows covering n tokens; a last piece shorter than 2 tokens is dropped."""
    for start in range(0, n - 1, window):
        yield slice(start, min(start + window, n))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass(frozen=True)
class Quality:
    """Teacher-forced scores of a model against a reference on the same tokens."""

    tokens: int  # positions scored
    perplexity: float
    reference_perplexity: float
    kl: float  # mean KL(reference || model) per position, nats
    top1: float  # fraction of positions where both put the same token first

    def __str__(self) -> str:
        return (
            f"ppl {self.perplexity:.3f} (reference {self.reference_perplexity:.3f}), "
            f"KL {self.kl:.4f} nats, top-1 agreement {self.top1:.1%}, {self.tokens} tokens"
        )


def perplexity(
    model_dir: str | Path,
    ids,
    window: int = 1024,
    chunk: int | None = None,
    threads: int | None = None,
) -> float:
    """exp(mean negative log-likelihood) of `ids` under the folder's model (module docstring)."""
    decoder = Decoder(model_dir, threads)
    ids = np.asarray(ids, dtype=np.int64)
    nll, count = 0.0, 0
    for part in windows(len(ids), window):
        logits = decoder.logits(ids[part], chunk)[:-1]
        targets = ids[part][1:]
        for row in range(0, len(targets), ROWS):
            logp = log_softmax(logits[row : row + ROWS])
            picked = logp[np.arange(len(logp)), targets[row : row + ROWS]]
            nll -= picked.sum()
            count += len(picked)
    return float(np.exp(nll / count))


def kl_and_top1(
    model_dir: str | Path,
    reference_dir: str | Path,
    ids,
    window: int = 1024,
    chunk: int | None = None,
    reference_chunk: int | None = None,
    threads: int | None = None,
) -> Quality:
    """KL(reference || model), top-1 agreement and both perplexities on the same windows.

    `chunk` applies to the model only (the reference runs whole windows unless
    `reference_chunk`), so a KV-cache variant can be compared with its plain build."""
    model = Decoder(model_dir, threads)
    # Anything with Decoder's logits() serves as the reference (e.g. logits cached on disk).
    reference = (
        reference_dir if hasattr(reference_dir, "logits") else Decoder(reference_dir, threads)
    )
    ids = np.asarray(ids, dtype=np.int64)
    nll = ref_nll = kl = 0.0
    agree = count = 0
    for part in windows(len(ids), window):
        ours = model.logits(ids[part], chunk)[:-1]
        theirs = reference.logits(ids[part], reference_chunk)[:-1]
        targets = ids[part][1:]
        for row in range(0, len(targets), ROWS):
            block = slice(row, row + ROWS)
            logp, ref_logp = log_softmax(ours[block]), log_softmax(theirs[block])
            picks = np.arange(len(logp)), targets[block]
            nll -= logp[picks].sum()
            ref_nll -= ref_logp[picks].sum()
            kl += (np.exp(ref_logp) * (ref_logp - logp)).sum()
            agree += int((ours[block].argmax(-1) == theirs[block].argmax(-1)).sum())
            count += len(logp)
    return Quality(
        tokens=count,
        perplexity=float(np.exp(nll / count)),
        reference_perplexity=float(np.exp(ref_nll / count)),
        kl=float(kl / count),
        top1=agree / count,
    )


def read_ids(path: str | Path, model_dir: str | Path) -> list[int]:
    """Token ids to score: a JSON list of ids as they are, or UTF-8 text encoded with the
    folder's exact tokenizer (SentencePiece's ids, starting with <s>)."""
    from internlm2_graph.tokenizer import exact_tokenizer
    from internlm2_graph.verify import read_text

    path = Path(path)
    if not path.is_file():
        raise InternLM2GraphError(f"{path}: no such file; pass a UTF-8 text file or a JSON list")
    if path.suffix == ".json":
        ids = json.loads(path.read_text())
        if not (isinstance(ids, list) and all(isinstance(i, int) for i in ids)):
            raise InternLM2GraphError(f"{path}: expected a JSON list of token ids, like [1, 2, 3]")
    else:
        ids = exact_tokenizer(model_dir).encode(read_text(path)).ids
    if len(ids) < 2:
        raise InternLM2GraphError(f"{path}: {len(ids)} token(s); scoring needs at least 2")
    return ids


def check_ids(ids: list[int], *model_dirs: str | Path) -> None:
    """Ids past a folder's vocabulary would index out of its embedding, and a reference with
    another vocabulary has no KL to compare: refuse both by name."""
    vocabs = [_vocab_size(model_dir) for model_dir in model_dirs]
    if len(set(vocabs)) > 1:
        raise InternLM2GraphError(
            f"{model_dirs[-1]}: vocabulary of {vocabs[-1]}, but {model_dirs[0]} has {vocabs[0]}; "
            "compare with a reference built from the same tokenizer"
        )
    for model_dir, vocab in zip(model_dirs, vocabs):
        if max(ids) >= vocab or min(ids) < 0:
            raise InternLM2GraphError(
                f"{model_dir}: token id {max(ids)} is outside its vocabulary of {vocab}; "
                "score text tokenized for this model (and a --reference with the same vocabulary)"
            )


def _vocab_size(model_dir: str | Path) -> int:
    return json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]["vocab_size"]
