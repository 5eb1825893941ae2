"""Calibrated int4 on full-size synthetic checkpoints: KL to the float model, RTN against GPTQ.

    python -m benchmarks run quality --model 1.8b --workdir DIR --param study=calibrated \
        methods=rtn,gptq settings=32-sym,128-sym eval_tokens=1024 window=512   # -e cuda

Random weights say nothing about perplexity, but what GPTQ promises holds for any weights: on
text calibration did not see, the built model's logits should be closer to the float model's
than round-to-nearest's are. The float reference is the checkpoint's own model in float32
numpy, a layer at a time (calibration.forward.float_forward, the pass that calibrates KV
scales), so a 7B needs no 31 GB fp32 folder; the int4 folders run in onnxruntime
(internlm2_graph.evaluate.Decoder),
built with accuracy_level 0 (the weights are measured, not int8 activations) and the default
calibration text. Each build runs in its own process: its wall time and peak RSS. With
`-e cuda` the folders are CUDA builds (GPTQ's products then run on the GPU,
calibration/compute.py) and their logits come from the CUDA execution provider. The checkpoint,
builds and the float reference's cache stay in --workdir for later methods.
Evaluation text: smollm2.eval_text() (prose), tokenized with the checkpoint's tokenizer.model;
KL(float || int4) per position, and top-1 agreement.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks import harness
from benchmarks.quant_quality import SETTINGS, bits_per_weight, measured_build
from benchmarks.rows import Row
from fixtures import smollm2
from internlm2_graph.evaluate import ROWS, Decoder, log_softmax, windows

PARAMS = {"methods": "rtn,gptq", "settings": "32-sym", "eval_tokens": 1024, "window": 512}
SMOKE = {"eval_tokens": 64, "window": 32, "methods": "rtn"}  # GPTQ: tests/test_gptq.py


def synthetic_checkpoint(workdir: Path, size: str, layers: int | None = None) -> Path:
    """The size's synthetic checkpoint in `workdir`, written if missing; with `layers`, one
    of its shapes but that many decoder layers (calibration streams a layer at a time, so a
    layer costs the same in it as in the whole model)."""
    from internlm2_graph.synthetic import make_config, write_checkpoint

    if layers is None:
        folder, config = workdir / f"synthetic-{size}", make_config(size)
    else:
        folder = workdir / f"synthetic-{size}-{layers}-layers"
        config = make_config(size, num_hidden_layers=layers)
    if not (folder / "config.json").is_file():
        write_checkpoint(folder, config)
    return folder


def eval_ids(checkpoint: Path, tokens: int) -> np.ndarray:
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))
    return np.asarray(processor.encode(smollm2.eval_text())[:tokens], dtype=np.int64)


def float_log_probs(checkpoint: Path, parts: list[np.ndarray]) -> list[np.ndarray]:
    """log-softmax of the float model's logits, per window (windows start at position 0)."""
    from internlm2_graph.calibration.forward import final_norm, float_forward
    from internlm2_graph.checkpoint import Checkpoint
    from internlm2_graph.config import InternLM2Config

    ckpt, config = Checkpoint(checkpoint), InternLM2Config.from_dir(checkpoint)
    h = final_norm(ckpt, config, float_forward(ckpt, config, parts))
    head = ckpt["output.weight"]
    logits = np.concatenate(
        [h @ head.read_rows(s, s + 16384).T for s in range(0, head.shape[0], 16384)], axis=1
    )
    out, start = [], 0
    for part in parts:
        end = start + len(part)  # a window shorter than ROWS must not take the next one's rows
        out.append(np.concatenate([log_softmax(logits[r : min(r + ROWS, end)]) for r in
                                   range(start, end, ROWS)]))  # fmt: skip
        start += len(part)
    return out


def compare(folder: Path, parts: list[np.ndarray], reference: list[np.ndarray]) -> dict:
    decoder = Decoder(folder)
    kl, agree, count = 0.0, 0, 0
    for part, ref in zip(parts, reference):
        logits = decoder.logits(part)
        for row in range(0, len(part), ROWS):
            logp, ref_logp = log_softmax(logits[row : row + ROWS]), ref[row : row + ROWS]
            kl += float((np.exp(ref_logp) * (ref_logp - logp)).sum())
            agree += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
            count += len(logp)
    return {"kl": kl / count, "top1": agree / count, "tokens": count}


def run(ctx: harness.Context) -> list[Row]:
    args = harness.settings(ctx, PARAMS)
    size, workdir, ep = ctx.model, ctx.workdir, ctx.ep
    checkpoint = synthetic_checkpoint(workdir, size)
    ids = eval_ids(checkpoint, args.eval_tokens)
    parts = [ids[w] for w in windows(len(ids), args.window)]
    cached = workdir / f"calibrated-{size}-float-{len(ids)}-{args.window}.npz"
    if cached.is_file():  # the float pass of a 7B costs minutes: kept for later methods
        with np.load(cached) as data:
            reference = [data[str(i)] for i in range(len(parts))]
    else:
        reference = float_log_probs(checkpoint, parts)
        np.savez(cached, **{str(i): r.astype(np.float32) for i, r in enumerate(reference)})
    print(f"float reference: {sum(map(len, parts))} positions in {len(parts)} windows", flush=True)
    out = []
    for setting in args.settings.split(","):
        for method in args.methods.split(","):
            options = {**SETTINGS[setting], "accuracy_level": "0", "algo_config": method}
            folder = workdir / f"calibrated-{size}-{method}-{setting}"
            if ep != "cpu":
                folder = folder.with_name(f"{folder.name}-{ep}")
            stats = measured_build(checkpoint, folder, "int4", options, finish=None, ep=ep)
            scored = folder / f"kl-{len(ids)}-{args.window}.json"
            if not scored.is_file():
                scored.write_text(json.dumps(compare(folder, parts, reference)))
            found = json.loads(scored.read_text())
            bpw = bits_per_weight(4, int(SETTINGS[setting]["block_size"]),
                                  SETTINGS[setting]["is_symmetric"] == "true")  # fmt: skip
            print(f"{size} {method} {setting}: KL {found['kl']:.5f}, top-1 {found['top1']:.1%}, "
                  f"build {stats['seconds']:.0f}s, peak {stats['peak_rss'] / 1e9:.2f} GB",
                  flush=True)  # fmt: skip
            params = {
                "tokens": found["tokens"],
                "window": args.window,
                "reference": "float32 numpy",
            }
            for metric, value, unit in (
                ("kl", found["kl"], "nats"),
                ("top1", found["top1"], ""),
                ("bits_per_weight", bpw, ""),
                ("seconds", stats["seconds"], "s"),
                ("peak_rss_gb", stats["peak_rss"] / 1e9, "GB"),
            ):
                out.append(
                    ctx.row(
                        variant=f"int4 {method} {setting} {ep}",
                        tool="ours",
                        metric=metric,
                        value=value,
                        unit=unit,
                        params=params,
                    )
                )
    return out
