"""One-off probes: each answered one question, and its docstring ends with the finding.

They are kept to be re-run when the question comes back (a new onnxruntime, another GPU), not
as part of the suites: `python -m benchmarks.probes.NAME --help`.

- calibrate_profile: where a calibrated build's time goes, layer by layer and step by step.
- calibrated_memory: peak RSS of a calibrated CPU build, per layer (is every layer's the same?).
- gptq_device: GPTQ of one weight in numpy against onnxruntime's CUDA provider.
- kv_cache_schemes: which quantized KV caches run where, and how far each moves the logits.
- mask_count: what counting the attention mask costs a step, int64 against float32.
- prequantized_builder: what onnxruntime-genai's builder does with pre-quantized InternLM2.
- quantize_speed: MatMulNBits quantization, the numpy port against onnxruntime's kernel.
- speculative_draft_probe: does onnxruntime-genai 0.18 run a CUDA draft model? (No.)
- torch_bin_check: our `.bin` reader and the fixtures' writer against real torch, bit for bit.
"""
