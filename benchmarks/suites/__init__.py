"""The suites `python -m benchmarks run` knows. Adding one: a module here (see
benchmarks/README.md, "Adding a suite") and its line below."""

from benchmarks.suites import decode, export, kernels, quality, serving, speculative

SUITES = {
    "export": export,
    "decode": decode,
    "quality": quality,
    "speculative": speculative,
    "kernels": kernels,
    "serving": serving,
}
