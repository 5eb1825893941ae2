"""Calibrated int4 on full-size synthetic checkpoints: KL to the float model, RTN against GPTQ.

    python -m benchmarks.calibrated_synthetic --size 1.8b [--workdir DIR] [--methods rtn,gptq]
        [--eval-tokens 1024] [--window 512] [--settings 32-sym,128-sym] [--ep cuda]

Random weights say nothing about perplexity, but what GPTQ promises holds for any weights: on
text calibration did not see, the built model's logits should be closer to the float model's
than round-to-nearest's are. The float reference is the checkpoint's own model in float32
numpy, a layer at a time (calibration.forward.float_forward, the pass that calibrates KV
scales), so a 7B
needs no 31 GB fp32 folder; the int4 folders run in onnxruntime (benchmarks.quality.Decoder),
built with accuracy_level 0 (the weights are measured, not int8 activations) and the default
calibration text. Each build runs in its own process: its wall time and peak RSS. With
`--ep cuda` the folders are CUDA builds (GPTQ's products then run on the GPU,
calibration/compute.py) and
their logits come from the CUDA execution provider.
Evaluation text: smollm2.eval_text() (prose), tokenized with the checkpoint's tokenizer.model;
KL(float || int4) per position, and top-1 agreement.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, uninstalled
from benchmarks import common  # noqa: E402
from benchmarks.quant_quality import SETTINGS, bits_per_weight, measured_build  # noqa: E402
from fixtures import smollm2  # noqa: E402
from internlm2_graph.evaluate import ROWS, Decoder, log_softmax, windows  # noqa: E402


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
        out.append(np.concatenate([log_softmax(logits[r : r + ROWS]) for r in
                                   range(start, start + len(part), ROWS)]))  # fmt: skip
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1.8b")
    parser.add_argument("--workdir", type=Path, default=smollm2.DEFAULT_WORKDIR)
    parser.add_argument("--methods", default="rtn,gptq")
    parser.add_argument("--settings", default="32-sym")
    parser.add_argument("--eval-tokens", type=int, default=1024)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--ep", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--machine", default=common.default_machine_name())
    args = parser.parse_args(argv)

    checkpoint = synthetic_checkpoint(args.workdir, args.size)
    ids = eval_ids(checkpoint, args.eval_tokens)
    parts = [ids[w] for w in windows(len(ids), args.window)]
    cached = args.workdir / f"calibrated-{args.size}-float-{len(ids)}-{args.window}.npz"
    if cached.is_file():  # the float pass of a 7B costs minutes: kept for later methods
        with np.load(cached) as data:
            reference = [data[str(i)] for i in range(len(parts))]
    else:
        reference = float_log_probs(checkpoint, parts)
        np.savez(cached, **{str(i): r.astype(np.float32) for i, r in enumerate(reference)})
    print(f"float reference: {sum(map(len, parts))} positions in {len(parts)} windows", flush=True)
    rows = []
    for setting in args.settings.split(","):
        for method in args.methods.split(","):
            options = {**SETTINGS[setting], "accuracy_level": "0", "algo_config": method}
            out = args.workdir / f"calibrated-{args.size}-{method}-{setting}"
            if args.ep != "cpu":
                out = out.with_name(f"{out.name}-{args.ep}")
            stats = measured_build(checkpoint, out, "int4", options, finish=None, ep=args.ep)
            scored = out / f"kl-{len(ids)}-{args.window}.json"
            if not scored.is_file():
                scored.write_text(json.dumps(compare(out, parts, reference)))
            row = {"method": method, "setting": setting, **stats, **json.loads(scored.read_text())}
            row["bpw"] = bits_per_weight(4, int(SETTINGS[setting]["block_size"]),
                                         SETTINGS[setting]["is_symmetric"] == "true")  # fmt: skip
            rows.append(row)
            print(f"{args.size} {method} {setting}: KL {row['kl']:.5f}, top-1 {row['top1']:.1%}, "
                  f"build {stats['seconds']:.0f}s, peak {stats['peak_rss'] / 1e9:.2f} GB",
                  flush=True)  # fmt: skip
    report(rows, args)


def report(rows: list[dict], args: argparse.Namespace) -> None:
    table = common.markdown_table(
        [
            "method",
            "block, symmetry",
            "bits/weight",
            "KL to float",
            "top-1 agreement",
            "build wall",
            "peak RSS",
        ],  # fmt: skip
        [
            [
                r["method"],
                r["setting"],
                f"{r['bpw']:.2f}",
                f"{r['kl']:.5f}",
                f"{r['top1']:.1%}",
                f"{r['seconds']:.0f} s",
                f"{r['peak_rss'] / 1e9:.2f} GB",
            ]  # fmt: skip
            for r in rows
        ],
    )
    info = common.machine_info()
    markdown = (
        f"# Calibrated int4 on a synthetic InternLM2-{args.size}\n\n"
        f"{info.get('cpu', '')}, {info.get('cpu_count', '')} cores; "
        f"`python -m benchmarks.calibrated_synthetic --size {args.size} --ep {args.ep}`; "
        f"{rows[0]['tokens'] if rows else 0} positions of smollm2.eval_text() in windows of "
        f"{args.window}; float reference in numpy (calibration.forward.float_forward).\n\n{table}\n"
    )
    print(markdown)
    common.write_results(f"calibrated-{args.size}-{args.machine}", {"rows": rows, **info}, markdown)


if __name__ == "__main__":
    main()
