"""The front door: checkpoint -> config + target -> graph skeleton -> weights bound lazily by
name -> the saver pulls each tensor (read, regroup, transpose, quantize) into the folder."""

from __future__ import annotations

import resource
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from internlm2_graph import package, prequantized, speculative
from internlm2_graph.calibration import data, drivers, kv
from internlm2_graph.calibration.recipes import TOKENS, Recipe, recipe_for
from internlm2_graph.checkpoint import Checkpoint
from internlm2_graph.config import InternLM2Config
from internlm2_graph.errors import InternLM2GraphError
from internlm2_graph.graph import build_graph
from internlm2_graph.hub import resolve_checkpoint
from internlm2_graph.kv_scales import scales_from_file
from internlm2_graph.precision import (
    LM_HEAD,
    QUANT_OPTIONS,
    Target,
    check_fpa_intb,
    parse_extra_options,
    resolve_target,
)
from internlm2_graph.progress import Progress, human_bytes, human_count
from internlm2_graph.sizes import graph_bytes, parameter_count
from internlm2_graph.tokenizer import PreparedTokenizer, prepare_tokenizer
from internlm2_graph.weights import WeightBinder, tied

EMBEDDING = "model.tok_embeddings.weight"


@dataclass(frozen=True)
class BuildSummary:
    output: Path
    parameters: int
    precision: str
    execution_provider: str
    output_bytes: int
    seconds: float
    peak_rss_bytes: int
    prequantized: str | None = None  # the format a pre-quantized checkpoint was read as

    def __str__(self) -> str:
        source = f" from {self.prequantized}" if self.prequantized else ""
        return (
            f"built {self.output}: {human_count(self.parameters)} parameters, {self.precision} on "
            f"{self.execution_provider}{source}, {human_bytes(self.output_bytes)} on disk, "
            f"{self.seconds:.1f} s, peak memory {human_bytes(self.peak_rss_bytes)}"
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
    recipe: Recipe | None = None,
) -> BuildSummary:
    """Convert an InternLM2 checkpoint (folder or hub id) into an ONNX Runtime GenAI folder.

    Everything is decided and checked before the first write: options, --output, config, the
    tokenizer's ids, and every tensor's name and shape (binding checks each one against the
    graph parameter it fills). The folder is then written beside --output and moved into place
    only when complete, so a failure or Ctrl-C leaves nothing behind. `recipe` replaces the
    calibrated algo_config's own (calibration/recipes.py: ablations).
    """
    start = time.perf_counter()
    progress = progress or Progress(quiet=True)
    spec, options, target, draft_target = _targets(precision, execution_provider, extra_options)
    recipe = _recipe(target, recipe)
    output = Path(output)
    package.check_output(output, overwrite)  # before a download that could take an hour
    folder = resolve_checkpoint(str(input), cache_dir=cache_dir, revision=revision, token=token)
    package.check_apart(output, folder)
    config = InternLM2Config.from_dir(folder)
    tokenizer = prepare_tokenizer(folder, config.vocab_size)
    vocab = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
    speculative.check_draft(spec, vocab, config.vocab_size, execution_provider)
    checkpoint = Checkpoint(folder)
    layout = prequantized.read_layout(folder)
    prequantized.check_dtypes(checkpoint, layout)
    if layout is not None:  # published 4-bit: its codes carried over, or dequantized exactly
        target = prequantized.target(layout, checkpoint, config, target, options)
        if draft_target is not None:
            draft_target = prequantized.target(layout, checkpoint, config, draft_target, options)
    target = for_checkpoint(target, checkpoint, config)
    if draft_target is not None:
        draft_target = for_checkpoint(draft_target, checkpoint, config)
    model, module = build_graph(config, target)
    sequences = _calibration_sequences(target, recipe, tokenizer, config)  # bad data fails now
    scales = scales_from_file(config, target)
    if _calibrated_kv(target):  # one float pass, layer by layer; it writes nothing
        scales = kv.calibrate_kv_cache(checkpoint, config, sequences, target.kv_cache, progress)
    binder = WeightBinder(checkpoint, config, allow_nonfinite, scales, layout=layout)
    binder.bind(module)
    draft_model = _draft_model(checkpoint, config, draft_target, allow_nonfinite, layout)
    expected_bytes = graph_bytes(model)
    if draft_model is not None:
        expected_bytes += graph_bytes(draft_model)
    # A chat turn ends with <|im_end|>: stop on it even when generation_config.json omits it.
    eos = list(dict.fromkeys([*config.eos_token_id, *tokenizer.info.turn_end_ids]))
    runtime_config = package.genai_config(config, target, eos)

    with (
        package.staged_folder(output, overwrite, expected_bytes) as staging,
        tempfile.TemporaryDirectory(dir=staging, prefix=".calibration") as scratch,
    ):
        tokenizer.write(staging)
        if recipe is not None:  # calibrated weights, spilled to `scratch` until saved
            binder.calibrated = drivers.calibrated_weights(
                checkpoint, config, sequences, target, Path(scratch), progress, recipe
            )
        # Tensors are read, converted and quantized lazily as the saver asks for them, so this
        # one bar covers all the heavy work.
        with progress.task("writing weights") as on_tensor:
            package.save_model(model, staging, target.filename, on_tensor)
        draft = staging / speculative.DRAFT_DIR
        if draft_model is not None:
            _write_draft(draft, draft_model, draft_target, tokenizer, config, eos, progress)
        elif spec.draft_folder is not None:
            speculative.copy_draft(spec.draft_folder, draft)
        runtime_config = speculative.with_speculative(runtime_config, spec, staging)
        package.write_json(staging / "genai_config.json", runtime_config)
    return BuildSummary(
        output=output,
        parameters=parameter_count(config),
        precision=precision,
        execution_provider=execution_provider,
        output_bytes=sum(f.stat().st_size for f in output.rglob("*") if f.is_file()),
        seconds=time.perf_counter() - start,
        peak_rss_bytes=peak_rss(),
        prequantized=target.prequantized,
    )


def _targets(
    precision: str, execution_provider: str, extra_options: dict | list | None
) -> tuple[speculative.Speculative, dict[str, str], Target, Target | None]:
    """The options decided: speculative decoding's, the model's own, its Target, the
    self-draft's."""
    if not isinstance(extra_options, dict):
        extra_options = parse_extra_options(extra_options)
    spec, options = speculative.split_options(extra_options)
    speculative.check_provider(spec, execution_provider)
    target = resolve_target(precision, execution_provider, options, speculative.OPTIONS)
    return spec, options, target, _draft_target(spec, precision, execution_provider, options)


def _recipe(target: Target, recipe: Recipe | None) -> Recipe | None:
    """How the weights are calibrated: None for round to nearest, else the algo_config's
    recipe, or the one given (which must be a recipe of that algo_config)."""
    if target.algorithm == "rtn":
        if recipe is not None:
            raise InternLM2GraphError(
                f"recipe {recipe.name} needs --extra_options algo_config={recipe.name}"
            )
        return None
    if recipe is not None and recipe.name != target.algorithm:
        raise InternLM2GraphError(
            f"recipe {recipe.name} does not calibrate algo_config={target.algorithm}; pass "
            f"algo_config={recipe.name}"
        )
    return recipe or recipe_for(target.algorithm)


def _calibrated_kv(target: Target) -> bool:
    """A quantized KV cache without a scale file: its scales are calibrated in the build."""
    return target.kv_cache is not None and target.kv_cache.scale_file is None


def _calibration_sequences(
    target: Target, recipe: Recipe | None, tokenizer: PreparedTokenizer, config: InternLM2Config
) -> list | None:
    """The calibration token sequences, or None when nothing is calibrated."""
    if recipe is None and not _calibrated_kv(target):
        return None
    budget = TOKENS if recipe is None else recipe.tokens
    return data.calibration_tokens(target.calibration_data, tokenizer.encode, config, budget)


def _draft_model(checkpoint, config, draft_target: Target | None, allow_nonfinite: bool, layout):
    """The self-draft's graph, bound to the same weights (quantized), or None."""
    if draft_target is None:
        return None
    draft_model, draft_module = build_graph(config, draft_target)
    draft_scales = scales_from_file(config, draft_target)
    binder = WeightBinder(checkpoint, config, allow_nonfinite, draft_scales, layout=layout)
    binder.bind(draft_module)
    return draft_model


def _write_draft(draft: Path, model, target: Target, tokenizer, config, eos, progress) -> None:
    """The self-draft as a complete folder of its own, so `model.draft` can be rebuilt from it
    at run time."""
    draft.mkdir()
    tokenizer.write(draft)
    with progress.task("writing the draft") as on_tensor:
        package.save_model(model, draft, target.filename, on_tensor)
    package.write_json(draft / "genai_config.json", package.genai_config(config, target, eos))


def for_checkpoint(target: Target, checkpoint: Checkpoint, config: InternLM2Config) -> Target:
    """The target for this checkpoint: tensor_precision bound to its depth; the lm_head on the
    embedding's codes where the checkpoint ties them (the same values under both names)."""
    target = target.for_layers(config.num_hidden_layers)
    if target.can_tie and tied(checkpoint, EMBEDDING, f"{LM_HEAD}.weight"):
        target = replace(target, tied_head=True)
    check_fpa_intb(target, config.num_hidden_layers, str(checkpoint.folder))
    return target


def _draft_target(
    spec: speculative.Speculative, precision: str, execution_provider: str, options: dict
) -> Target | None:
    """The self-draft's precision and options: a quantized target's weight options carry over;
    a quantized KV cache does not (the draft's cache is small, and calibrating twice buys
    nothing)."""
    if spec.mode != "draft" or spec.draft_folder is not None:
        return None
    quantized = precision in ("int4", "int8")
    carried = {
        k: v
        for k, v in options.items()
        if k == "enable_cuda_graph" or (quantized and k in QUANT_OPTIONS)
    }
    return resolve_target(spec.draft, execution_provider, carried)


def peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
