"""Torch-free InternLM2 / InternLM2.5 -> ONNX Runtime GenAI model folders."""

from internlm2_graph.config import InternLM2Config
from internlm2_graph.convert import BuildSummary, build
from internlm2_graph.errors import InternLM2GraphError

__all__ = ["BuildSummary", "InternLM2Config", "InternLM2GraphError", "build"]
__version__ = "0.1.0"
