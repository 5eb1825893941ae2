"""Calibrated int4/int8 without torch: numpy (or onnxruntime on a GPU), one decoder layer at a
time. Each module owns one job; import the one you need (this file imports nothing, so that
weights.py can take the store without the machinery):

- data.py      calibration text or token ids -> token sequences
- forward.py   the streamed float32 decoder (Batch, LayerWeights, decoder_layer, float_forward)
- recipes.py   how each algo_config runs: frozen GPTQ / AWQ recipes
- gptq.py      GPTQ and GPTAQ's math on MatMulNBits' block grid
- awq.py       AWQ's math: scale search, clipping, folding
- drivers.py   the per-layer drivers: a recipe over the whole model (calibrated_weights)
- kv.py        quantized KV cache scales from the float model's keys and values
- store.py     Calibrated: the spill folder the saver reads calibrated weights from
- compute.py   where the products run: numpy, or onnxruntime on a GPU
"""
