"""The front door: checkpoint -> config -> weight stream -> graph -> saved folder."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path

from internlm2_graph import package
from internlm2_graph.checkpoint import Checkpoint
from internlm2_graph.config import InternLM2Config
from internlm2_graph.graph import build_graph
from internlm2_graph.hub import resolve_checkpoint
from internlm2_graph.precision import parse_extra_options, resolve_target
from internlm2_graph.progress import Progress
from internlm2_graph.tokenizer import write_tokenizer
from internlm2_graph.weights import WeightBinder, check_checkpoint


@dataclass(frozen=True)
class BuildSummary:
    output: Path
    parameters: int
    precision: str
    execution_provider: str
    output_bytes: int
    seconds: float
    peak_rss_bytes: int

    def __str__(self) -> str:
        return (
            f"built {self.output}: {self.parameters / 1e9:.3g}B parameters, {self.precision} "
            f"on {self.execution_provider}, {self.output_bytes / 1e9:.3g} GB on disk, "
            f"{self.seconds:.1f} s, peak memory {self.peak_rss_bytes / 1e9:.2f} GB"
        )


def build(
    input: str | Path,
    output: str | Path,
    precision: str = "fp32",
    execution_provider: str = "cpu",
    extra_options: dict[str, str] | list[str] | None = None,
    *,
    cache_dir: str | None = None,
    revision: str | None = None,
    token: str | None = None,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    progress: Progress | None = None,
) -> BuildSummary:
    """Convert an InternLM2 checkpoint (folder or hub id) into an ONNX Runtime GenAI folder."""
    start = time.perf_counter()
    progress = progress or Progress(quiet=True)
    if not isinstance(extra_options, dict):
        extra_options = parse_extra_options(extra_options)
    target = resolve_target(precision, execution_provider, extra_options)
    folder = resolve_checkpoint(str(input), cache_dir=cache_dir, revision=revision, token=token)
    config = InternLM2Config.from_dir(folder)
    checkpoint = Checkpoint(folder)
    check_checkpoint(checkpoint, config)

    output = Path(output)
    with package.staged_folder(output, overwrite) as staging:
        tokenizer = write_tokenizer(folder, staging, config.vocab_size)
        model, module = build_graph(config, target)
        WeightBinder(checkpoint, config, allow_nonfinite).bind(module)
        with progress.task("writing weights") as on_tensor:
            package.save_model(model, staging, target.filename, on_tensor)
        eos = list(dict.fromkeys([*config.eos_token_id, *tokenizer.turn_end_ids]))
        package.write_json(staging / "genai_config.json", package.genai_config(config, target, eos))
    size = sum(f.stat().st_size for f in output.iterdir() if f.is_file())
    return BuildSummary(
        output=output,
        parameters=config.num_parameters,
        precision=precision,
        execution_provider=execution_provider,
        output_bytes=size,
        seconds=time.perf_counter() - start,
        peak_rss_bytes=peak_rss(),
    )


def peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
