"""What every suite is handed (a Context) and how a run of suites becomes result rows.

A suite is a module in benchmarks/suites/ with a docstring (its description), PARAMS (its own
settings and their defaults), SMOKE (the settings of a seconds-long run on the tiny checkpoint)
and `run(ctx) -> list[Row]`; benchmarks/suites/__init__.py lists them. A suite's STUDIES map
names to longer, single-purpose modules of benchmarks/ with the same four parts, run instead of
the suite with `--param study=NAME` (the study's own PARAMS then apply). The runner prepares the
checkpoint, builds folders on request (cached per precision and options), and stamps every row
with the machine, versions and date.
"""

from __future__ import annotations

import importlib
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

from benchmarks import common, rows


@dataclass
class Context:
    model: str  # the checkpoint's label in the rows: a synthetic size or a folder name
    workdir: Path
    source: Path | None = None  # a checkpoint folder; None: the synthetic `model`, on first use
    ep: str = "cpu"
    precisions: tuple[str, ...] = ("int4",)
    tools: tuple[str, ...] = ("ours",)  # "builder" too: the onnxruntime-genai builder (torch)
    repeat: int = 3
    params: dict[str, str] = field(default_factory=dict)  # the suite's PARAMS, as given
    log: Path | None = None

    @property
    def checkpoint(self) -> Path:
        """Written on first use: a study of given folders only labels its rows with `model`."""
        if self.source is None:
            self.source = synthetic_checkpoint(self.model, self.workdir)
        return self.source

    def param(self, key: str, default):
        """A suite setting, converted to the type of its default."""
        text = self.params.get(key)
        if text is None:
            return default
        if isinstance(default, bool):
            return text.lower() in ("1", "true", "yes")
        return type(default)(text)

    def row(self, **fields) -> rows.Row:
        return rows.Row(**{"suite": "", "model": self.model, **fields})

    def build(self, precision: str, options: tuple[str, ...] = (), tool: str = "ours") -> Path:
        """A built folder of the checkpoint (ours in-process; the builder in a child process),
        reused by every suite of the run that asks for the same one."""
        name = "-".join([tool, precision, self.ep, *(o.replace("=", "_") for o in options)])
        out = self.workdir / "built" / name
        if (out / "genai_config.json").is_file():
            return out
        if tool == "ours":
            from internlm2_graph import build

            build(self.checkpoint, out, precision, self.ep, list(options), overwrite=True)
            return out
        measured = common.run_measured(
            builder_command(self.llama_copy(), out, precision, self.ep, options),
            self.workdir / "logs" / f"{name}.log",
            env={"HF_HUB_OFFLINE": "1"},
        )
        if not measured.ok:
            raise RuntimeError(f"builder {precision}: {measured.status}; see {measured.log}")
        return out

    def llama_copy(self) -> Path:
        """The checkpoint in the Llama layout, which the builder reads without remote code."""
        from fixtures.llama_layout import write_llama_copy

        llama = self.workdir / f"{self.checkpoint.name}-llama"
        if not (llama / "config.json").is_file():
            write_llama_copy(self.checkpoint, llama)
        return llama


def our_command(checkpoint: Path, out: Path, precision: str, ep: str, options=()) -> list[str]:
    command = [sys.executable, "-m", "internlm2_graph", "-i", str(checkpoint), "-o", str(out)]
    command += ["-p", precision, "-e", ep, "--overwrite", "-q"]
    return command + (["--extra_options", *options] if options else [])


def builder_command(llama: Path, out: Path, precision: str, ep: str, options=()) -> list[str]:
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(llama)]
    command += ["-o", str(out), "-p", precision, "-e", ep, "-c", f"{out}-cache"]
    return command + (["--extra_options", *options] if options else [])


def synthetic_checkpoint(size: str, workdir: Path) -> Path:
    from internlm2_graph.synthetic import make_config, write_checkpoint

    folder = workdir / f"{size}-internlm2"
    if not (folder / "config.json").is_file():
        write_checkpoint(folder, make_config(size), chat=True, seed=0)
    return folder


def study(suite, name: str | None):
    """The module a suite runs: itself, or the study of that name among its STUDIES."""
    if not name:
        return suite
    names = getattr(suite, "STUDIES", {})
    if name not in names:
        suite_name = suite.__name__.rsplit(".", 1)[-1]
        raise SystemExit(
            f"error: suite {suite_name} has no study {name!r}; its studies: {', '.join(names)}"
        )
    return importlib.import_module(f"benchmarks.{names[name]}")


def built_variant(name: str, folder: Path, ep: str) -> str:
    """A built folder's precision, from its name or its graph, and the provider: "int4 cuda"."""
    from benchmarks import convert

    entry = {"model": name, "graph": common.quant_summary(folder)["matmulnbits"]}
    return " ".join(filter(None, [convert.precision_of(entry, folder.name, Path("")), ep]))


def metric_rows(ctx: Context, results: list[dict], units: dict[str, str], **fields) -> list:
    """A row per metric in `units` that `results` (repeated measurements) carry: its median and
    spread over them; `fields` (variant, tool, params) are the rows' own."""
    out = []
    for metric, unit in units.items():
        values = [r[metric] for r in results if r.get(metric) is not None]
        if values:
            out.append(ctx.row(metric=metric, unit=unit, **fields, **rows.measured(values)))
    return out


def settings(ctx: Context, params: dict) -> SimpleNamespace:
    """A study's settings as attributes, each typed by its default in `params`."""
    return SimpleNamespace(**{key: ctx.param(key, default) for key, default in params.items()})


def folders(ctx: Context, key: str = "folders") -> dict[str, Path]:
    """A setting of NAME=FOLDER,...: built folders to measure instead of building."""
    named = {}
    for spec in filter(None, ctx.param(key, "").split(",")):
        name, _, folder = spec.rpartition("=")
        named[name or Path(folder).name] = Path(folder)
    return named


def modules(names: list[str], params: dict[str, str]) -> dict:
    """suite name -> the module that runs (the suite or its study); an unknown study or setting
    stops here, before anything is built."""
    from benchmarks.suites import SUITES

    out = {name: study(SUITES[name], params.get("study")) for name in names}
    for name, module in out.items():
        known = {"study", *module.PARAMS, *(k for s in names for k in SUITES[s].PARAMS)}
        unknown = set(params) - known
        if unknown:
            raise SystemExit(
                f"error: unknown --param {sorted(unknown)}; {name} takes {sorted(module.PARAMS)}"
            )
    return out


def run_suites(names: list[str], ctx: Context, smoke: bool = False) -> list[rows.Row]:
    """Each suite in turn, every row stamped with this machine, the run's start and its suite."""
    where = rows.this_machine()
    out = []
    for name, suite in modules(names, ctx.params).items():
        params = {**({k: str(v) for k, v in suite.SMOKE.items()} if smoke else {}), **ctx.params}
        start = time.perf_counter()
        print(f"{name}: {suite.__doc__.splitlines()[0]}", flush=True)
        made = suite.run(replace(ctx, params=params))
        print(f"{name}: {len(made)} rows in {time.perf_counter() - start:.0f} s", flush=True)
        out += [replace(r, suite=name, **where) for r in made]
    return out
