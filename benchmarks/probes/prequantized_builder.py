"""What onnxruntime-genai's builder does with the same pre-quantized checkpoints.

Needs torch + transformers + onnxruntime-genai in the running Python (the `bench` extra);
run with that interpreter:

    python -m benchmarks.probes.prequantized_builder [--workdir DIR]

1. The builder's command line on a tiny InternLM2 checkpoint in each format (AWQ gemm, GPTQ,
   GPTQ act-order, compressed-tensors), written by synthetic.prequantized. The folder gets a
   minimal `configuration_internlm2.py` and a Llama tokenizer class (the hub repos ship their own
   remote code), so that AutoConfig and AutoTokenizer get past and the builder reaches its
   quantized loader. Recorded: exit status and the error line.
2. Its requantization, on the same codes: the loader's own unpack -> dequantize (fp16) ->
   quantize -> pack path (loaders/awq.py, gptq.py: `repack_quantized_tensor`) applied to one
   packed layer with the tensor names it understands, its output codes compared with the
   file's. That is what it would write for a Llama-named checkpoint (it cannot read InternLM2
   names, part 1).

Finding (onnxruntime-genai 0.18, benchmarks/results/prequantized-builder-cpu2.md): the builder
refuses all four: AWQ, GPTQ and GPTQ act-order stop at "model.layers.0.attention.wqkv.qweight
... is not recognized" (InternLM2's fused wqkv), compressed-tensors at "ModelOpt FP8/NVFP4
checkpoints are only supported on the CUDA EP". Its requantization path would keep every code
of an AWQ or GPTQ layer (0 of 2048 x 2048 changed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import markdown_table, write_results
from internlm2_graph.synthetic import make_config, write_checkpoint
from internlm2_graph.synthetic.prequantized import (
    act_order_g_idx,
    pack_awq,
    pack_gptq,
    quantize_groups,
    write_prequantized,
)

DEFAULT_WORKDIR = Path("/tmp/internlm2-bench/prequantized-builder")
VARIANTS = {
    "awq": ("awq", False, False),
    "gptq": ("gptq", True, False),
    "gptq-act": ("gptq", False, True),
    "compressed-tensors": ("compressed-tensors", True, False),
}
CONFIGURATION = """from transformers import PretrainedConfig


class InternLM2Config(PretrainedConfig):
    model_type = "internlm2"

    def __init__(self, vocab_size=103168, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
                 hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6,
                 bias=True, rope_theta=10000, rope_scaling=None, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.intermediate_size, self.num_hidden_layers = intermediate_size, num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.hidden_act, self.max_position_embeddings = hidden_act, max_position_embeddings
        self.rms_norm_eps, self.bias, self.rope_theta = rms_norm_eps, bias, rope_theta
        self.rope_scaling = rope_scaling
        super().__init__(**kwargs)
"""


def builder_cli(workdir: Path) -> dict:
    config = make_config(
        "tiny", max_position_embeddings=128, hidden_size=128, intermediate_size=256
    )
    src = write_checkpoint(workdir / "float", config, seed=2)
    results = {}
    for name, (fmt, symmetric, act_order) in VARIANTS.items():
        folder = write_prequantized(src, workdir / name, fmt, 32, symmetric, act_order)
        (folder / "configuration_internlm2.py").write_text(CONFIGURATION)
        # Nor does the tokenizer's remote code come along: a Llama tokenizer reads the same
        # tokenizer.model, and the builder loads the tokenizer before the weights.
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
        tokenizer_config.pop("auto_map", None)
        tokenizer_config["tokenizer_class"] = "LlamaTokenizer"
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
        out = workdir / f"{name}-builder-out"
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder)]
        command += ["-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(workdir / "cache")]
        command += ["--extra_options", "hf_remote=true"]  # the folder ships its config code
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        error = next(
            (line for line in reversed(lines) if "Error" in line), lines[-1] if lines else ""
        )
        results[name] = {"returncode": done.returncode, "last_error": error.strip()}
        print(name, results[name], flush=True)
    return results


def requantized_codes(fmt: str, act_order: bool, seed: int = 0) -> dict:
    """One 2048 x 2048 layer (group 128): the builder loader's repack of our packed tensors,
    its codes against the file's."""
    import torch
    from onnxruntime_genai.models.loaders.awq import AWQModel
    from onnxruntime_genai.models.loaders.base import QuantizedTensorModule
    from onnxruntime_genai.models.loaders.gptq import GPTQModel

    rng = np.random.default_rng(seed)
    n = k = 2048
    group = 128
    weight = rng.standard_normal((n, k)).astype(np.float32) * 0.02
    g_idx = act_order_g_idx(k, group, rng) if act_order else None
    symmetric = fmt == "gptq" and not act_order
    codes, zeros, scales = quantize_groups(weight, group, symmetric, g_idx)
    packed = (
        pack_awq(codes, zeros, scales) if fmt == "awq" else pack_gptq(codes, zeros, scales, g_idx)
    )
    module = QuantizedTensorModule()
    module.qweight = torch.from_numpy(packed["qweight"])
    module.qzeros = torch.from_numpy(packed["qzeros"])
    module.scales = torch.from_numpy(packed["scales"])
    module.bits, module.group_size_value = 4, group
    module.in_features, module.out_features = k, n
    module.g_idx = torch.from_numpy(packed["g_idx"].astype(np.int64)) if fmt == "gptq" else None
    loader = object.__new__(AWQModel if fmt == "awq" else GPTQModel)  # its methods, no files
    loader.quant_type = fmt
    loader.repack_quantized_tensor(module, clear_g_idx=not act_order)
    b = module.qweight.numpy()  # uint8 [N, K/group, group/2], input 2j in the low nibble
    got = np.stack([b & 0xF, b >> 4], axis=-1).reshape(n, -1)[:, :k]
    if act_order and fmt == "gptq":
        pass  # codes stay in input order; g_idx selects the scales at run time
    changed = got != codes
    return {
        "layer": [n, k],
        "group": group,
        "codes_changed": int(changed.sum()),
        "fraction_changed": float(changed.mean()),
        "max_code_step": int(np.abs(got.astype(int) - codes.astype(int)).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--name", default="prequantized-builder-cpu2")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    cli = builder_cli(args.workdir)
    requant = {}
    for name, (fmt, act) in {
        "awq": ("awq", False),
        "gptq": ("gptq", False),
        "gptq-act": ("gptq", True),
    }.items():
        try:
            requant[name] = requantized_codes(fmt, act)
        except Exception as err:  # record what its loader does, whatever it is
            requant[name] = {"error": f"{type(err).__name__}: {err}"}
        print(name, requant[name], flush=True)
    rows = [
        [
            name,
            str(cli[name]["returncode"]),
            cli[name]["last_error"][:160],
            json.dumps(requant.get(name, {})),
        ]
        for name in cli
    ]
    table = markdown_table(
        ["checkpoint", "builder exit", "builder says", "its requantization of one layer"], rows
    )
    markdown = f"onnxruntime-genai builder on pre-quantized InternLM2 checkpoints\n\n{table}\n"
    print(markdown)
    print(write_results(args.name, {"cli": cli, "requantized": requant}, markdown))


if __name__ == "__main__":
    main()
