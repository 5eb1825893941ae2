"""What several test modules share: quantization specs and problems, a built folder's logits,
tokenizer folders, calibration sequences, an in-memory row source. (Checkpoint surgery lives in
surgery.py, the hub stand-in in hub_server.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from internlm2_graph.precision import QuantSpec

SPECS = [
    QuantSpec(bits=4, block_size=32, symmetric=True),
    QuantSpec(bits=4, block_size=16, symmetric=False),
    QuantSpec(bits=4, block_size=128, symmetric=True),
    QuantSpec(bits=8, block_size=32, symmetric=False),
]


def correlated_inputs(seed: int, tokens: int, k: int) -> np.ndarray:
    """Activations with what real ones have: correlated channels and a few large ones."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) / np.sqrt(k)
    x = rng.standard_normal((tokens, k)) @ (np.eye(k) + 2 * mix)
    x[:, rng.choice(k, max(1, k // 16), replace=False)] *= 8
    return x.astype(np.float32)


def session_logits(model_dir: Path, ids: np.ndarray) -> np.ndarray:
    """Logits [seq, vocab] of a built folder for one sequence, empty KV cache."""
    import onnxruntime as ort

    genai = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    session = ort.InferenceSession(str(model_dir / genai["filename"]))
    feeds = {"input_ids": ids[None], "attention_mask": np.ones((1, len(ids)), np.int64)}
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values"):
            shape = (1, genai["num_key_value_heads"], 0, genai["head_size"])
            feeds[inp.name] = np.zeros(shape, np.float32)
    return session.run(["logits"], feeds)[0][0].astype(np.float64)


def calibration_sequences(
    checkpoint: Path, max_tokens: int, option: str | None = None
) -> list[np.ndarray]:
    """The calibration sequences a build of `checkpoint` takes (default text, or the
    calibration_data file `option`), at most `max_tokens` tokens."""
    from internlm2_graph.calibration.data import calibration_tokens
    from internlm2_graph.config import InternLM2Config
    from internlm2_graph.tokenizer import prepare_tokenizer

    config = InternLM2Config.from_dir(checkpoint)
    tokenizer = prepare_tokenizer(checkpoint, config.vocab_size)
    return calibration_tokens(option, tokenizer.encode, config, max_tokens)


def tokenizer_folder(checkpoint: Path, out: Path, vocab_size: int) -> Path:
    """The tokenizer files of a build, and the genai_config.json og.Tokenizer reads (no model)."""
    from internlm2_graph.tokenizer import write_tokenizer

    write_tokenizer(checkpoint, out, vocab_size)
    model = {"type": "internlm2", "context_length": 64, "bos_token_id": 1, "eos_token_id": 2}
    (out / "genai_config.json").write_text(json.dumps({"model": {**model, "pad_token_id": 2}}))
    return out


class ArrayRows:
    """A weights.Source over an array in memory, recording the slices asked for."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.shape, self.asked = array, array.shape, []

    def rows(self, start: int, stop: int) -> np.ndarray:
        self.asked.append((start, stop))
        return self.array[start:stop]
