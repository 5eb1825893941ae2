"""Does onnxruntime-genai 0.18 run a CUDA target with its CUDA draft? (It does not.)

    python -m benchmarks.probes.speculative_draft_probe FOLDER  # a cuda build, speculative=draft

Measured on the H200 (benchmarks/results/gpu-h200-2026-11-30.md): og refuses the pair with
"Target and draft must use the same execution provider": its Config fills the decoder's
provider list from provider_options but not the draft's, so any non-CPU pair mismatches
(fixed upstream later: the draft's list is filled too). clear_providers() passes the check only
by moving the target to the CPU.

Finding: see the paragraph above (og 0.18 runs no CUDA draft: `-e cuda` with a draft is
refused in one line, internlm2_graph/speculative.py).
"""

import sys
import time

import numpy as np
import onnxruntime_genai as og

from internlm2_graph.runtime import og_config

folder = sys.argv[1]


def run(model, label):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=320, do_sample=False, min_length=300)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([[1] + list(range(100, 160))], np.int32))
    t, n = time.perf_counter(), 0
    while not gen.is_done():
        gen.generate_next_token()
        n += 1
    dt = time.perf_counter() - t
    print(label, "device", getattr(model, "device_type", "?"), f"{n / dt:.1f} tok/s", flush=True)


run(og.Model(og_config(folder, "off")), "target alone (cuda)")
config = og_config(folder, "off")
config.clear_providers()
run(og.Model(config), "target alone after clear_providers")
try:
    og.Model(og_config(folder, "draft"))
    print("draft as written: loads")
except Exception as err:
    print("draft as written:", err)
config = og_config(folder, "draft")
config.clear_providers()
try:
    run(og.Model(config), "target + draft after clear_providers")
except Exception as err:
    print("draft after clear_providers:", err)
