"""Quality per byte on the untilted SmolLM2 bed: llama.cpp's types beside our layouts.

    python -m benchmarks run quality --workdir /tmp/internlm2-bench --param study=per_byte \
        llamacpp=Q4_K_M+imatrix,Q4_1 ours=q4_mixed variants="b64:block_size=64 algo_config=rtn"

The bed (fixtures/llamacpp.py) is SmolLM2-135M-Instruct moved off its Q4_1 grid, as an F32
GGUF both sides start from. Every row is scored by the same evaluation (internlm2_graph.evaluate):
its fp32 InternLM2 checkpoint built by this package, teacher-forced on the same windows of
1024 tokens, `eval_tokens` each of prose and code (smollm2.eval_text / code_text); perplexity,
KL(bed fp32 || row) per token and top-1 agreement with the bed.

- llama.cpp rows: `llama-quantize` of the bed with its default mix for each type, with and
  without an importance matrix; the GGUF is dequantized by gguf-py (smollm2.convert, fp32), so
  what is measured is the weights' error alone, like ours at accuracy_level=0. Bytes: the GGUF
  file (its tensors, plus ~2 MB of tokenizer and metadata).
- our rows: an int4 build of the bed checkpoint with the row's options, accuracy_level=0.
  Bytes: model.onnx + its data (weights, rotary tables, graph).

One calibration text for both sides: `calibrate.default_text()` as SmolLM2 ids without the
sequences that overlap the evaluation text (quant_quality.calibration_ids), GPTAQ's budget
(32 sequences of 512); llama-imatrix reads the same sequences decoded to text, 512-token chunks.
Rows are cached under the workdir (rows/NAME.json): rerunning scores only what is new. `variants`
adds ad-hoc rows, NAME:KEY=VALUE KEY=VALUE;... (ablations); a key `recipe.FIELD` sets a field of
the method's recipe (calibration/recipes.py) rather than an --extra_option: `recipe.damp=1e6`
turns GPTQ's error feedback off and leaves its importance-weighted grid search, which is what
llama.cpp does with an importance matrix. Rows per model: MB, and perplexity, KL and top-1 on
both texts (`all`), prose and code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from benchmarks import common, convert, harness, quant_quality
from benchmarks.rows import Row
from fixtures import llamacpp, smollm2
from internlm2_graph.evaluate import kl_and_top1, log_softmax, windows

LLAMACPP_TYPES = ("Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "IQ4_XS", "Q5_K_M")
BASE = {"accuracy_level": "0", "algo_config": "gptaq"}
# Our rows: name -> --extra_options (BASE and the calibration file are added).
VARIANTS = {
    "int4-b32": {"block_size": "32"},
    "q4_mixed": {"quant_preset": "q4_mixed"},
    "q4_small": {"quant_preset": "q4_small"},
}
TEXTS = ("prose", "code")
CTX = 512
PARAMS = {
    "llamacpp": ",".join(f"{t},{t}+imatrix" for t in LLAMACPP_TYPES),  # TYPE or TYPE+imatrix
    "ours": ",".join(VARIANTS),
    "variants": "",
    "eval_tokens": 4096,
    "calibration_sequences": 32,  # of 512 tokens, for GPTAQ and llama-imatrix alike
    "threads": 0,  # onnxruntime threads when scoring (0: its default)
    "held_out": False,  # also score smollm2.held_out_text (text "held", never in "all")
}
SMOKE: dict = {}  # real weights and llama.cpp's tools: SmolLM2-135M (fixtures.smollm2)


class CachedLogits:
    """The bed's fp32 logits of each evaluation window, computed once and kept on disk (every
    row is compared with the same windows: this halves the cost of scoring a row)."""

    def __init__(self, model_dir: Path, folder: Path, threads: int | None) -> None:
        self.model_dir, self.folder, self.threads = model_dir, folder, threads
        self._decoder = None

    def logits(self, ids: np.ndarray, chunk: int | None = None) -> np.ndarray:
        import hashlib

        key = hashlib.sha1(np.asarray(ids, np.int64).tobytes()).hexdigest()[:16]
        path = self.folder / f"{key}.npy"
        if not path.is_file():
            if self._decoder is None:
                from internlm2_graph.evaluate import Decoder

                self._decoder = Decoder(self.model_dir, self.threads)
            self.folder.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial.npy")
            np.save(partial, self._decoder.logits(ids, chunk))
            partial.rename(path)
        return np.load(path, mmap_mode="r")


def mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


class Bench:
    def __init__(
        self,
        workdir: Path,
        eval_tokens: int,
        threads: int | None = None,
        sequences: int = 32,
        held_out: bool = False,
    ) -> None:
        self.workdir, self.threads, self.sequences = workdir, threads, sequences
        workdir.mkdir(parents=True, exist_ok=True)
        self.bed = llamacpp.untilted_gguf(workdir)
        self.checkpoint = llamacpp.checkpoint_of(self.bed, workdir)
        self.texts = {
            "prose": smollm2.encode(self.checkpoint, smollm2.eval_text(), eval_tokens),
            "code": smollm2.encode(self.checkpoint, smollm2.code_text(), eval_tokens),
        }
        if held_out:  # scored beside the others, never folded into `all`
            self.texts["held"] = smollm2.encode(
                self.checkpoint, smollm2.held_out_text(), eval_tokens
            )
        self.builds = workdir / "builds"
        self.fp32 = self.builds / "fp32"
        quant_quality.measured_build(self.checkpoint, self.fp32, "fp32", {})
        # scores depend on the text scored
        self.rows_dir = workdir / f"rows-{eval_tokens}{'-held' if held_out else ''}"
        self.rows_dir.mkdir(exist_ok=True)
        self._calibration: tuple[Path, Path] | None = None
        self.reference = CachedLogits(self.fp32, workdir / "fp32-logits", threads)

    # --- the shared calibration text ----------------------------------------------------------

    def calibration(self) -> tuple[Path, Path]:
        """(ids JSON for our builds, text file for llama-imatrix): the same sequences, all 32
        of GPTAQ's budget or `sequences` of them, evenly spaced."""
        if self._calibration is None:
            tag = "" if self.sequences == 32 else f"-{self.sequences}"
            ids_file = self.workdir / f"calibration-ids{tag}.json"
            text_file = self.workdir / f"calib{tag}.txt"
            if not ids_file.is_file():
                from internlm2_graph.calibration.recipes import recipe_for

                held_out = list(self.texts.values())
                ids, _ = quant_quality.calibration_ids(
                    self.checkpoint, held_out, recipe_for("gptaq").tokens
                )
                picks = np.linspace(0, len(ids) - 1, min(self.sequences, len(ids)))
                ids = [ids[i] for i in picks.round().astype(int)]
                ids_file.write_text(json.dumps(ids))
                tokenizer = smollm2.smollm2_tokenizer(self.checkpoint)
                # Each sequence starts with <s>; llama-imatrix adds its own BOS per chunk.
                pieces = [tokenizer.decode(s[1:], skip_special_tokens=False) for s in ids]
                text_file.write_text("".join(pieces), encoding="utf-8")
            self._calibration = ids_file, text_file
        return self._calibration

    # --- scoring -------------------------------------------------------------------------------

    def score(self, model_dir: Path) -> dict:
        out = {}
        for text, ids in self.texts.items():
            q = kl_and_top1(model_dir, self.reference, ids, window=1024, threads=self.threads)
            out[text] = {"perplexity": q.perplexity, "kl": q.kl, "top1": q.top1, "tokens": q.tokens,
                         "reference_perplexity": q.reference_perplexity}  # fmt: skip
        return self._all(out)

    @staticmethod
    def _all(out: dict) -> dict:
        """Both texts as one: the issue's "prose and code"."""
        count = sum(out[t]["tokens"] for t in TEXTS)
        out["all"] = {
            "perplexity": float(
                np.exp(sum(np.log(out[t]["perplexity"]) * out[t]["tokens"] for t in TEXTS) / count)
            ),
            "kl": sum(out[t]["kl"] * out[t]["tokens"] for t in TEXTS) / count,
            "top1": sum(out[t]["top1"] * out[t]["tokens"] for t in TEXTS) / count,
        }
        return out

    def cached(self, name: str, make) -> dict:
        path = self.rows_dir / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
        row = {"name": name, **make()}
        path.write_text(json.dumps(row, indent=2))
        print(f"{name}: {mb(row['bytes'])} MB, KL {row['all']['kl']:.4f}, "
              f"ppl {row['all']['perplexity']:.3f}", flush=True)  # fmt: skip
        return row

    # --- rows ----------------------------------------------------------------------------------

    def fp32_row(self) -> dict:
        """The bed itself: its perplexity from the cached logits (KL 0, top-1 1 by definition)."""

        def make():
            out = {}
            for text, ids in self.texts.items():
                nll, count = 0.0, 0
                for part in windows(len(ids), 1024):
                    logits, targets = self.reference.logits(ids[part])[:-1], ids[part][1:]
                    for row in range(0, len(targets), 256):  # bounds the float64 copy
                        logp = log_softmax(logits[row : row + 256])
                        picked = targets[row : row + 256]
                        nll -= logp[np.arange(len(picked)), picked].sum()
                    count += len(targets)
                ppl = float(np.exp(nll / count))
                out[text] = {"perplexity": ppl, "kl": 0.0, "top1": 1.0, "tokens": count,
                             "reference_perplexity": ppl}  # fmt: skip
            return {"kind": "fp32", "bytes": model_bytes(self.fp32), **self._all(out)}

        return self.cached("fp32", make)

    def llamacpp_row(self, kind: str, with_imatrix: bool) -> dict:
        tag = "" if self.sequences == 32 else f"{self.sequences}"
        name = f"llama.cpp-{kind}" + (f"-imatrix{tag}" if with_imatrix else "")

        def make():
            bin_dir = llamacpp.tools(self.workdir)
            matrix = None
            if with_imatrix:
                ids_file, text_file = self.calibration()
                chunks = len(json.loads(ids_file.read_text()))
                out = self.workdir / f"imatrix{tag}.gguf"
                matrix = llamacpp.imatrix(bin_dir, self.bed, text_file, out, CTX, chunks)
            ggufs = self.workdir / "ggufs"
            ggufs.mkdir(exist_ok=True)
            gguf = llamacpp.quantize(bin_dir, self.bed, ggufs / f"{name}.gguf", kind, matrix)
            checkpoint = llamacpp.checkpoint_of(gguf, self.workdir)
            build = self.builds / name
            quant_quality.measured_build(checkpoint, build, "fp32", {})
            row = {
                "kind": "llama.cpp",
                "bytes": gguf.stat().st_size,
                "tensor_bytes": llamacpp.tensor_bytes(gguf),
                "types": llamacpp.tensor_types(gguf),
                **self.score(build),
            }
            shutil.rmtree(build)  # 0.65 GB each: the scores are what is kept
            shutil.rmtree(checkpoint)
            return row

        return self.cached(name, make)

    def our_row(self, name: str, options: dict) -> dict:
        def make():
            ids_file, _ = self.calibration()
            extra, tweaks = split_options(options)
            full = {**BASE, **extra}
            if full["algo_config"] != "rtn":
                full["calibration_data"] = str(ids_file)
            build = self.builds / name
            stats = quant_quality.measured_build(self.checkpoint, build, "int4", full, tweaks)
            return {
                "kind": "ours",
                "options": options,
                "bytes": model_bytes(build),
                "build_seconds": stats["seconds"],
                "peak_rss": stats["peak_rss"],
                "formats": common.quant_summary(build)["matmulnbits"],
                **self.score(build),
            }

        return self.cached(name, make)


def split_options(options: dict[str, str]) -> tuple[dict[str, str], dict]:
    """A variant's settings as (--extra_options, recipe fields): `recipe.FIELD=VALUE` keys go to
    the method's recipe, their values read as JSON (numbers, true/false)."""
    extra = {k: v for k, v in options.items() if not k.startswith("recipe.")}
    fields = (k for k in options if k not in extra)
    recipe = {k.removeprefix("recipe."): json.loads(options[k]) for k in fields}
    return extra, recipe


def model_bytes(folder: Path) -> int:
    """The model's files (graph + external data), not the tokenizer or configs."""
    genai = json.loads((folder / "genai_config.json").read_text())
    onnx_file = folder / genai["model"]["decoder"]["filename"]
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith(onnx_file.name))


def run(ctx: harness.Context) -> list[Row]:
    args = harness.settings(ctx, PARAMS)
    bed = ctx.workdir / "smollm2" / "bed"  # beside the checkpoint the other SmolLM2 studies share
    bench = Bench(
        bed, args.eval_tokens, args.threads or None, args.calibration_sequences, args.held_out
    )
    rows = [bench.fp32_row()]
    for item in filter(None, args.llamacpp.split(",")):
        kind, _, matrix = item.partition("+")
        rows.append(bench.llamacpp_row(kind, matrix == "imatrix"))
    variants = {name: VARIANTS[name] for name in filter(None, args.ours.split(","))}
    for item in filter(None, args.variants.split(";")):
        name, _, options = item.partition(":")
        variants[name] = dict(o.split("=", 1) for o in options.split())
    for name, options in variants.items():
        rows.append(bench.our_row(name, options))
    return [r for row in rows for r in convert.per_byte_rows(row, args.eval_tokens)]
