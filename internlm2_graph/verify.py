"""Run a built folder with onnxruntime_genai and compare it with the numpy reference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from internlm2_graph.errors import InternLM2GraphError
from internlm2_graph.reference import Reference
from internlm2_graph.runtime import check_model_folder, eos_ids, genai, genai_config, load_model

__all__ = ["Verdict", "check_model_folder", "encode_prompt", "eos_ids", "og_greedy", "verify"]


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


def encode_prompt(checkpoint: str | Path, text: str) -> list[int]:
    """<s> + SentencePiece ids of `text`, as the checkpoint's own tokenizer.model encodes it."""
    import sentencepiece

    path = Path(checkpoint) / "tokenizer.model"
    if not path.is_file():
        raise InternLM2GraphError(
            f"{path}: not found; --against must be the checkpoint folder the model was built from"
        )
    processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
    return [processor.bos_id(), *processor.encode(text)]


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
