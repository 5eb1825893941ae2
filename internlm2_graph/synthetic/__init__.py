"""Synthetic InternLM2 checkpoints: any config, the real file layout, a real small tokenizer."""

from internlm2_graph.synthetic.checkpoint import SIZES, make_config, write_checkpoint

__all__ = ["SIZES", "make_config", "write_checkpoint"]
