"""The per-layer drivers: a calibrated algo_config over the whole model, one layer at a time.

Calibration hidden states plus one decoder layer's weights are in memory at a time
(forward.streamed). Inside a layer the linears are quantized in the order they run (wqkv; wo;
w1 and w3, which share their input; w2), each Hessian taken from activations that already went
through the quantized linears before it ("true sequential"), and the quantized layer's output
feeds the next layer, so each quantized layer corrects the errors of those before it. GPTAQ
runs the float model beside it (_FloatModel). Results are spilled to a scratch folder
(store.Calibrated) and read back when the saver asks for that weight. How each method runs is
its recipe (recipes.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from internlm2_graph.calibration.awq import (
    awq_clip,
    awq_scales,
    fold_scales,
    search_rows,
    tied_per_kv_head,
)
from internlm2_graph.calibration.compute import NUMPY, for_execution_provider
from internlm2_graph.calibration.forward import (
    Batch,
    Device,
    LayerWeights,
    decoder_layer,
    final_norm,
    streamed,
)
from internlm2_graph.calibration.gptq import (
    factor_for,
    float_aim_map,
    float_aim_weight,
    gptq,
)
from internlm2_graph.calibration.recipes import AWQ, GPTQ, RECIPES, Recipe, recipe_for
from internlm2_graph.calibration.store import Calibrated
from internlm2_graph.checkpoint import Checkpoint
from internlm2_graph.config import InternLM2Config
from internlm2_graph.precision import QuantSpec, Target
from internlm2_graph.progress import Progress
from internlm2_graph.quantize import dequantize, quantize

HEAD_ROWS = 16384  # lm_head rows quantized at a time (the Hessian factor is shared)


def calibrated_weights(
    checkpoint: Checkpoint,
    config: InternLM2Config,
    sequences: list[np.ndarray],
    target: Target,
    scratch: Path,
    progress: Progress | None = None,
    recipe: Recipe | None = None,
) -> Calibrated:
    """The weights of a calibrated algo_config (gptq, gptaq, awq; "rtn" is the saver's own), by
    its recipe (default: recipe_for(target.algorithm))."""
    recipe = recipe_for(target.algorithm) if recipe is None else recipe
    # A tied head reads the embedding's codes (rounded to nearest): nothing to calibrate.
    body, head = target.quant, None if target.tied_head else target.lm_head_quant
    if isinstance(recipe, GPTQ):
        device = for_execution_provider(target.execution_provider)
        specs = target.linear_spec if target.tensor_rules else body
        return gptq_model(checkpoint, config, sequences, specs, head, scratch, progress,
                          recipe, device)  # fmt: skip
    if target.kv_cache is not None:
        # A quantized KV cache stores the values with scales taken from the float model's
        # values (kv.calibrate_kv_cache, or a scale file): AWQ must leave them, and so wo,
        # unscaled.
        recipe = replace(recipe, scale_values=False)
    return awq_model(checkpoint, config, sequences, body, head, scratch, progress, recipe)


# --- GPTQ and GPTAQ ---------------------------------------------------------------------------


def gptq_model(
    checkpoint: Checkpoint,
    config: InternLM2Config,
    sequences: list[np.ndarray],
    body: QuantSpec | Callable[[str], QuantSpec],
    head: QuantSpec | None,
    scratch: Path,
    progress: Progress | None = None,
    recipe: GPTQ = RECIPES["gptq"],
    device: Device = NUMPY,
) -> Calibrated:
    """GPTQ every linear of the model, streaming one layer at a time; see the module docstring.

    `body` is the spec of the decoder's linears, or a function of a linear's checkpoint path
    giving its spec (tensor_precision); `head` the lm_head's (None: kept float or tied).
    `recipe` says how (act_order, grid search, dampening; `float_aim`: GPTAQ, each linear aimed
    at the float model's output). `device` runs the products (compute.py).
    """
    result = Calibrated(scratch)
    floats = _FloatModel() if recipe.float_aim else None
    spec_of = body if callable(body) else lambda _path: body

    def layer(n: int, weights: LayerWeights, x: np.ndarray, batch: Batch) -> np.ndarray:
        aims = None if floats is None else floats.aims(weights, x, batch, device)
        prefix = f"model.layers.{n}"
        return _gptq_layer(prefix, weights, x, batch, spec_of, result, recipe, device, aims)

    def lm_head(h: np.ndarray) -> None:
        float_h = None
        if floats is not None:
            float_h = final_norm(checkpoint, config, floats.x)
            floats.x = None  # the float stream ends here
        _gptq_head(checkpoint, h, head, result, recipe, device, float_h)

    streamed(checkpoint, config, sequences, layer, progress, f"calibrating ({recipe.name})",
             lm_head if head is not None else None)  # fmt: skip
    return result


@dataclass
class FloatOutputs:
    """The float model's output of a linear, recorded instead of its input when that is
    smaller (gptq.float_aim_weight)."""

    output: np.ndarray


class _FloatModel:
    """GPTAQ's second stream: the float model's hidden states beside the quantized ones, and
    what each group of linears needs of them to aim at the float model's output."""

    def __init__(self) -> None:
        self.x: np.ndarray | None = None

    def aims(self, weights: LayerWeights, x: np.ndarray, batch: Batch, device: Device) -> dict:
        """Run the float layer (on the quantized model's x for the first layer, where the two
        are the same embedding) and return, per group of linear names, the float model's input
        to it, or its FloatOutputs where that is smaller (w2: N < K)."""
        aims, by_output = {}, set()

        def record(inputs: np.ndarray, *names: str) -> list[np.ndarray]:
            ws = weights.as_read(inputs, *names)
            if len(ws) == 1 and len(ws[0]) < inputs.shape[1]:
                by_output.add(names[0])  # caught by `output` as the float pass computes it
            else:
                aims[names] = inputs
            return ws

        def output(name: str, y: np.ndarray) -> None:
            if name in by_output:
                aims[(name,)] = FloatOutputs(y)

        start = x if self.x is None else self.x
        self.x = decoder_layer(weights, start, batch, record, on_output=output, device=device)
        return aims


def _gptq_layer(prefix, weights, x, batch, spec, result, recipe, device, aims=None):
    """GPTQ the layer's linears in the order they run; returns the quantized layer's output.
    `spec(path)` is the format of the linear at checkpoint path `path`. `aims` maps each group
    of names to the float model's input to it, or FloatOutputs (_FloatModel.aims).
    """

    def quantized(inputs: np.ndarray, *names: str) -> list[np.ndarray]:
        """GPTQ `names` (sharing `inputs`), save them, return their dequantized weights."""
        gram = device.gram(inputs)
        ws = [weights.linears[each] for each in names]
        for each in names:
            weights.linears[each] = None  # ws holds the float weights now
        if aims is not None:  # before GPTQ's own factor: one K x K inverse at a time
            ws = _aimed(ws, aims.pop(names), inputs, gram, recipe, device)
        factor = factor_for(gram, recipe, device)
        del gram
        out = []
        for i, each in enumerate(names):
            path = f"{prefix}.{each}"
            q = gptq(ws[i], factor.factor, spec(path), factor.order, factor.importance, device)
            ws[i] = None
            result.save(path, q)
            out.append(dequantize(q))
        return out

    return decoder_layer(weights, x, batch, quantized, device=device)


def _aimed(ws, aim, inputs, gram, recipe: GPTQ, device) -> list[np.ndarray]:
    """The float weights `ws` mapped to what GPTQ must round so that the layer aims at the
    float model's output (gptq.float_aim_map); `ws` is emptied as it goes."""
    if isinstance(aim, FloatOutputs):
        return [float_aim_weight(ws.pop(), aim.output, inputs, gram, device,
                                 ridge=recipe.aim_ridge)]  # fmt: skip
    mapping = float_aim_map(aim, inputs, gram, device, ridge=recipe.aim_ridge)
    return [device.matmul(w, mapping, transpose_b=True) for w in ws]


def _gptq_head(checkpoint, h, spec, result, recipe: GPTQ, device=NUMPY, float_h=None) -> None:
    """GPTQ the lm_head on its input h (the final norm's output), HEAD_ROWS rows at a time;
    towards the float model's logits on its own final norm output `float_h`, if given."""
    gram = device.gram(h)
    mapping = None
    if float_h is not None:
        mapping = float_aim_map(float_h, h, gram, device, ridge=recipe.aim_ridge)
    factor = factor_for(gram, recipe, device)
    del gram
    ref = checkpoint["output.weight"]

    def rows(start: int) -> np.ndarray:
        w = ref.read_rows(start, start + HEAD_ROWS)
        return w if mapping is None else device.matmul(w, mapping, transpose_b=True)

    parts = [
        gptq(rows(start), factor.factor, spec, factor.order, factor.importance, device)
        for start in range(0, ref.shape[0], HEAD_ROWS)
    ]
    result.save_rows("output", parts)


# --- AWQ ---------------------------------------------------------------------------------------


def awq_model(
    checkpoint: Checkpoint,
    config: InternLM2Config,
    sequences: list[np.ndarray],
    body: QuantSpec,
    head: QuantSpec | None,
    scratch: Path,
    progress: Progress | None = None,
    recipe: AWQ = RECIPES["awq"],
) -> Calibrated:
    """AWQ every decoder linear, streaming one layer at a time (awq.py); the folded norm
    weights and wqkv biases are kept as float overrides. The lm_head is rounded as the recipe's
    `head` says (GPTQ on the quantized model's last hidden states, or left to the saver)."""
    result = Calibrated(scratch)

    def layer(n: int, weights: LayerWeights, x: np.ndarray, batch: Batch) -> np.ndarray:
        return _awq_layer(f"model.layers.{n}", weights, x, batch, body, result, recipe)

    def lm_head(h: np.ndarray) -> None:
        _gptq_head(checkpoint, h, head, result, recipe.gptq)

    gptq_head = head is not None and recipe.head == "gptq"
    streamed(checkpoint, config, sequences, layer, progress, "calibrating (awq)",
             lm_head if gptq_head else None)  # fmt: skip
    return result


def _awq_layer(prefix, weights, x, batch, spec, result, recipe: AWQ) -> np.ndarray:
    """AWQ one layer: a float pass records each group's input, the scales are searched on it
    (AutoAWQ's recipe: every group against the float layer) and folded, then a pass through
    the quantized layer gives the next layer's input."""
    config = batch.config
    seen = {}

    def record(inputs: np.ndarray, *names: str) -> list[np.ndarray]:
        mean_abs = np.mean(np.abs(inputs), axis=0)
        if names == ("attention.wo",):
            mean_abs = tied_per_kv_head(mean_abs, config)
        seen[names] = (mean_abs, search_rows(inputs))
        return weights.as_read(inputs, *names)

    decoder_layer(weights, x, batch, record)
    scales = {
        names: awq_scales([weights.linears[n] for n in names], rows, mean_abs, spec)
        for names, (mean_abs, rows) in seen.items()
        if recipe.scale_values or names != ("attention.wo",)
    }
    folded = fold_scales(weights, scales, config)
    weights.linears.clear()  # the folded copies replace the float weights
    result.save_float(f"{prefix}.attention_norm.weight", folded.attention_norm)
    result.save_float(f"{prefix}.ffn_norm.weight", folded.ffn_norm)
    if "attention.wqkv" in folded.biases and ("attention.wo",) in scales:
        result.save_float(f"{prefix}.attention.wqkv.bias", folded.biases["attention.wqkv"])

    def quantized(inputs: np.ndarray, *names: str) -> list[np.ndarray]:
        """Round `names` (clipped first), save them, return their dequantized weights."""
        if recipe.rounding == "gptq":
            factor = factor_for(NUMPY.gram(inputs), recipe.gptq)
        out = []
        for name in names:
            weight = folded.linears[name]
            if recipe.rounding == "gptq":
                q = gptq(weight, factor.factor, spec, factor.order, factor.importance)
            else:
                if recipe.clip:
                    s = scales.get(names, np.float32(1))
                    weight = _clipped(name, weight, seen[names][1] / s, spec, config)
                q = quantize(weight, spec)
            result.save(f"{prefix}.{name}", q)
            out.append(dequantize(q))
            folded.linears[name] = None  # free the float weight
        return out

    return decoder_layer(folded, x, batch, quantized)


def _clipped(name, weight, rows, spec, config) -> np.ndarray:
    """awq_clip of a weight; of wqkv only the value rows, as AutoAWQ: the query and key rows'
    error reaches the output through softmax, which a linear output error misjudges."""
    if name != "attention.wqkv":
        return awq_clip(weight, rows, spec)
    kv, g, d = config.num_key_value_heads, config.group, config.head_dim
    grouped = weight.reshape(kv, g + 2, d, -1).copy()
    values = grouped[:, g + 1].reshape(kv * d, -1)
    grouped[:, g + 1] = awq_clip(values, rows, spec).reshape(kv, d, -1)
    return grouped.reshape(weight.shape)
