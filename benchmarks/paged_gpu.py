"""The paged graph on CUDA against the numpy reference and our GroupQueryAttention graph.

For small checkpoints with InternLM2's real head shapes (head_dim 128, 8 KV heads, groups of 2,
4 and 6: the 1.8B, 7B and 20B), the same steps an engine would schedule run through onnxruntime
directly: packed prompts of different lengths (one crossing a 256-token block), decode steps,
a mixed step (a continuation chunk ahead of decode tokens, one sequence idle), more decoding.
Each sequence's logits rows are compared with the float64 reference (reference.py) and with our
GroupQueryAttention graph fed the same sequence alone. Then og.Engine's greedy tokens on the
paged folder are compared with the reference's.

    python -m benchmarks run serving -e cuda --workdir /tmp/paged-check --param study=paged_check

Rows: per shape and precision, the worst relative logit error of the paged graph against the
reference, of the GQA graph against it and of the two against each other, and the share of
og.Engine's greedy tokens equal to the reference's (fp16).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SHAPES = {"g2": 16, "g4": 32, "g6": 48}  # query heads over 8 KV heads of 128
BLOCK = 256
PROMPTS = {"a": 300, "b": 17, "c": 1, "d": 129}
STEPS = [
    [(name, n) for name, n in PROMPTS.items()],
    [("a", 1), ("b", 1), ("c", 1), ("d", 1)],
    [("a", 1), ("b", 1), ("c", 1), ("d", 1)],
    [("b", 40), ("a", 1), ("d", 1)],
    [("d", 1), ("c", 1), ("b", 1), ("a", 1)],
]


def checkpoint(work: Path, heads: int) -> Path:
    from internlm2_graph.synthetic import make_config, write_checkpoint

    folder = work / f"ckpt-{heads}"
    if not (folder / "config.json").is_file():
        config = make_config(
            "tiny",
            hidden_size=heads * 128,
            num_attention_heads=heads,
            num_key_value_heads=8,
            num_hidden_layers=2,
            intermediate_size=512,
            vocab_size=2048,
            max_position_embeddings=4096,
        )
        write_checkpoint(folder, config, chat=True, seed=heads)
    return folder


def built(source: Path, out: Path, precision: str, options: list[str]) -> Path:
    from internlm2_graph import build

    if not (out / "genai_config.json").is_file():
        build(source, out, precision, "cuda", options)
    return out


class PagedRunner:
    """Sequences in scattered blocks of one pool on the GPU, the op updating it in place."""

    def __init__(
        self, session, config, blocks: int = 32, device: str = "cuda", dtype=np.float16
    ) -> None:
        import onnxruntime as ort

        self.session = session
        shape = (blocks, BLOCK, config.num_key_value_heads, config.head_dim)
        self.pool = {
            f"{i}.{kind}": ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), device, 0)
            for i in range(config.num_hidden_layers)
            for kind in ("key", "value")
        }
        self.free = list(np.random.default_rng(0).permutation(blocks))
        self.blocks: dict[str, list[int]] = {}
        self.lengths: dict[str, int] = {}

    def step(self, batch: list[tuple[str, np.ndarray]]) -> np.ndarray:
        past = [self.lengths.setdefault(name, 0) for name, _ in batch]
        for (name, ids), cached in zip(batch, past):
            owned = self.blocks.setdefault(name, [])
            while len(owned) * BLOCK < cached + len(ids):
                owned.append(self.free.pop())
        table = np.full((len(batch), max(len(self.blocks[n]) for n, _ in batch)), -1, np.int32)
        for i, (name, _) in enumerate(batch):
            table[i, : len(self.blocks[name])] = self.blocks[name]
        new = [len(ids) for _, ids in batch]
        binding = self.session.io_binding()
        feeds = {
            "input_ids": np.concatenate([ids for _, ids in batch]).astype(np.int64),
            "cumulative_sequence_lengths": np.cumsum([0, *new]).astype(np.int32),
            "past_sequence_lengths": np.array(past, np.int32),
            "block_table": table,
            "attention_metadata": np.array(
                [max(new), max(p + n for p, n in zip(past, new)), 1], np.int32
            ),
        }
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output("logits")
        for layer_kind, value in self.pool.items():
            binding.bind_ortvalue_input(f"past_key_values.{layer_kind}", value)
            binding.bind_ortvalue_output(f"present.{layer_kind}", value)
        self.session.run_with_iobinding(binding)
        logits = binding.copy_outputs_to_cpu()[0]
        for (name, ids), cached in zip(batch, past):
            self.lengths[name] = cached + len(ids)
        return logits.astype(np.float64)


class GQARunner:
    """Our GroupQueryAttention graph, one sequence at a time, caches on the host."""

    def __init__(self, folder: Path, config) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(
            str(folder / "model.onnx"), providers=["CUDAExecutionProvider"]
        )
        self.config = config
        self.caches: dict[str, dict] = {}

    def forward(self, name: str, ids: np.ndarray) -> np.ndarray:
        c = self.config
        kind = {i.name: i.type for i in self.session.get_inputs()}["past_key_values.0.key"]
        dtype = np.float16 if kind == "tensor(float16)" else np.float32
        empty = np.zeros((1, c.num_key_value_heads, 0, c.head_dim), dtype)
        past = self.caches.get(name) or {
            f"past_key_values.{i}.{kind}": empty
            for i in range(c.num_hidden_layers)
            for kind in ("key", "value")
        }
        total = past["past_key_values.0.key"].shape[2] + len(ids)
        feeds = {
            "input_ids": ids[None].astype(np.int64),
            "attention_mask": np.ones((1, total), np.int64),
            **past,
        }
        names = [o.name for o in self.session.get_outputs()]
        logits, *presents = self.session.run(names, feeds)
        self.caches[name] = {
            n.replace("present", "past_key_values"): v for n, v in zip(names[1:], presents)
        }
        return logits[0].astype(np.float64)


def compare(got: np.ndarray, want: np.ndarray) -> dict:
    diff = got - want
    return {
        "max_abs": float(np.abs(diff).max()),
        "rel": float(np.linalg.norm(diff) / np.linalg.norm(want)),
        "argmax_agree": float(np.mean(got.argmax(-1) == want.argmax(-1))),
    }


def check_graphs(source: Path, paged: Path, gqa: Path, precision: str) -> dict:
    """Per step: paged vs reference, GQA vs reference, paged vs GQA (worst over sequences)."""
    from internlm2_graph.config import InternLM2Config
    from internlm2_graph.precision import resolve_target
    from internlm2_graph.reference import Cache, Reference, quantized_reference

    config = InternLM2Config.from_dir(source)
    reference = (
        Reference(source)
        if precision == "fp16"
        else quantized_reference(source, resolve_target(precision, "cuda"))
    )
    import onnxruntime as ort

    session = ort.InferenceSession(str(paged / "model.onnx"), providers=["CUDAExecutionProvider"])
    runner, gqa_runner = PagedRunner(session, config), GQARunner(gqa, config)
    rng = np.random.default_rng(11)
    caches = {name: Cache() for name in PROMPTS}
    steps, gqa_error = [], None
    for batch in STEPS:
        tokens = [(name, rng.integers(100, config.vocab_size, n)) for name, n in batch]
        logits = runner.step(tokens)
        row, worst = 0, {}
        for name, ids in tokens:
            want, caches[name] = reference.forward(ids, caches[name])
            got = logits[row : row + len(ids)]
            row += len(ids)
            found = [("paged_vs_reference", compare(got, want))]
            if gqa_error is None:
                try:  # the GQA graph is a second opinion; its failure must not hide the first
                    got_gqa = gqa_runner.forward(name, ids)
                    found += [
                        ("gqa_vs_reference", compare(got_gqa, want)),
                        ("paged_vs_gqa", compare(got, got_gqa)),
                    ]
                except Exception as err:
                    gqa_error = f"{type(err).__name__}: {err}"
            for key, value in found:
                old = worst.get(key)
                worst[key] = value if old is None or value["rel"] > old["rel"] else old
        steps.append({"batch": [(n, k) for n, k in batch], **worst})
    # fp16 logits: within twice the GQA graph's error (or 5e-3 relative without it), plus slack.
    ok = all(
        s["paged_vs_reference"]["rel"]
        <= 2 * s.get("gqa_vs_reference", {"rel": 2.5e-3})["rel"] + 2e-3
        for s in steps
    )
    return {"steps": steps, "ok": ok, "gqa_error": gqa_error}


def check_engine(source: Path, paged: Path, output: int = 8) -> dict:
    """og.Engine greedy on the paged folder, prompts of different lengths at once, against the
    reference's greedy tokens (fp16 near-ties can flip a token: the share is reported)."""
    from benchmarks.engine_load import drive, open_engine
    from internlm2_graph.reference import Reference

    reference = Reference(source)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(100, 2048, n) for n in (300, 17, 1, 129, 64)]
    _, engine = open_engine(paged)
    records = drive(engine, [[(p, output)] for p in prompts], same_request=False)
    got = {r["stream"]: r["ids"] for r in records}
    rows = []
    for i, prompt in enumerate(prompts):
        want, _ = reference.greedy(prompt, output)
        first = next((k for k, (a, b) in enumerate(zip(got[i], want)) if a != b), None)
        rows.append({"prompt": len(prompt), "identical": got[i] == want, "first_difference": first})
    return {"sequences": rows, "identical_share": float(np.mean([r["identical"] for r in rows]))}


PARAMS = {"shapes": ",".join(SHAPES), "precisions": "fp16,int4"}
SMOKE: dict = {}
ERRORS = ("paged_vs_reference", "gqa_vs_reference", "paged_vs_gqa")


def check(work: Path, shape: str, precision: str) -> dict:
    """One shape and precision: the graphs' steps, og.Engine's greedy tokens (fp16), or the
    error that stopped it (one failing shape must not hide the others)."""
    source = checkpoint(work, SHAPES[shape])
    key = f"{shape}-{precision}"
    try:
        # A small pool: og.Engine would otherwise take 0.6 of the GPU for a tiny model.
        options = ["use_paged_attention=true", "num_blocks=64"]
        paged = built(source, work / f"{key}-paged", precision, options)
        gqa = built(source, work / f"{key}-gqa", precision, [])
        result = check_graphs(source, paged, gqa, precision)
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"}
    if precision == "fp16":
        try:
            result["engine"] = check_engine(source, paged)
        except Exception as err:
            result["engine"] = {"error": f"{type(err).__name__}: {err}"}
    return result


def run(ctx) -> list:
    from benchmarks import harness

    settings = harness.settings(ctx, PARAMS)
    work = ctx.workdir / "paged-check"
    work.mkdir(parents=True, exist_ok=True)
    out = []
    for shape in settings.shapes.split(","):
        for precision in settings.precisions.split(","):
            result = check(work, shape, precision)
            print(shape, precision, json.dumps(result)[:600], flush=True)
            if "error" in result:
                raise RuntimeError(f"paged_check {shape} {precision}: {result['error']}")
            variant, params = f"{precision} cuda {shape}", {"ok": result["ok"]}
            found = {
                metric: max(step[metric]["rel"] for step in result["steps"] if metric in step)
                for metric in ERRORS
                if any(metric in step for step in result["steps"])
            }
            share = result.get("engine", {}).get("identical_share")
            if share is not None:
                found["engine_greedy_identical"] = share
            for metric, value in found.items():
                unit = "" if metric.startswith("engine") else "relative"
                row = {"metric": metric, "value": value, "unit": unit, "params": params}
                out.append(ctx.row(variant=variant, tool="ours", **row))
    return out
