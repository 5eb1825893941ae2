"""InternLM2Config: what config.json and generation_config.json say, checked once."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from internlm2_graph.errors import InternLM2GraphError

# The graph counts attention-mask positions in float32 (modules.attention_lengths): exact to 2**24.
MAX_POSITIONS = 2**24

ARCHITECTURE = "InternLM2ForCausalLM"
ROPE_SCALING_TYPES = ("linear", "dynamic")
# Hugging Face's GenerationConfig defaults, for what generation_config.json leaves out. top_k 0
# means "no top-k filter", in transformers and onnxruntime-genai alike, so it is kept as is.
SAMPLING_DEFAULTS = {
    "do_sample": False,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "num_beams": 1,
    "repetition_penalty": 1.0,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
}


@dataclass(frozen=True)
class RopeScaling:
    type: str
    factor: float


@dataclass(frozen=True)
class InternLM2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: tuple[int, ...] = (2,)
    pad_token_id: int = 0
    generation: dict = field(default_factory=dict, compare=False)
    source: str = field(default="config.json", compare=False)

    def __post_init__(self) -> None:
        where = self.source
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InternLM2GraphError(
                    f"{where}: '{name}' must be a positive integer, got {value!r}"
                )
        if self.hidden_size % self.num_attention_heads:
            raise InternLM2GraphError(
                f"{where}: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}; fix one of them"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise InternLM2GraphError(
                f"{where}: num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_key_value_heads {self.num_key_value_heads}; each KV head must serve a "
                "whole group of query heads"
            )
        if self.head_dim % 2:
            raise InternLM2GraphError(
                f"{where}: head_dim {self.head_dim} (hidden_size / num_attention_heads) is odd; "
                "rotary embeddings need an even head size"
            )
        if self.tie_word_embeddings:
            raise InternLM2GraphError(
                f"{where}: tie_word_embeddings=true is not an InternLM2 layout "
                "(it ships a separate output.weight); set it to false"
            )
        if self.context_length > MAX_POSITIONS:
            scaled = "" if self.rope_scaling is None else " x rope_scaling factor"
            raise InternLM2GraphError(
                f"{where}: max_position_embeddings {self.max_position_embeddings}{scaled} gives "
                f"{self.context_length} positions, more than the {MAX_POSITIONS} the graph counts "
                "exactly; lower max_position_embeddings"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def group(self) -> int:
        """Query heads per KV head (the GQA ratio)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def context_length(self) -> int:
        """Longest sequence the rotary table covers; scaling stretches the trained window."""
        if self.rope_scaling is None:
            return self.max_position_embeddings
        return int(self.max_position_embeddings * max(self.rope_scaling.factor, 1.0))

    def positions(self, max_length: int | None = None) -> int:
        """How many positions a build serves: the trained context, or a longer `max_length`
        where the rotary scaling defines every position (dynamic NTK). A longer one is refused
        rather than cut, so that no requested length is lost silently."""
        if max_length is not None and max_length > MAX_POSITIONS:
            raise InternLM2GraphError(
                f"--extra_options max_length={max_length} is more than the {MAX_POSITIONS} "
                f"positions the graph counts exactly; use max_length <= {MAX_POSITIONS}"
            )
        if max_length is None or max_length <= self.context_length:
            return self.context_length
        if self.rope_scaling is not None and self.rope_scaling.type == "dynamic":
            return max_length
        scaling = (
            ""
            if self.rope_scaling is None
            else f" x rope_scaling factor {self.rope_scaling.factor:g}"
        )
        raise InternLM2GraphError(
            f"--extra_options max_length={max_length} is longer than the {self.context_length} "
            f"positions {self.source} gives (max_position_embeddings "
            f"{self.max_position_embeddings}{scaling}), and its rotary embedding is not defined "
            f"beyond them; use max_length <= {self.context_length} (only dynamic rope_scaling "
            "extends to any length)"
        )

    @property
    def sampling(self) -> dict:
        """The search settings generation_config.json gives, Hugging Face's defaults elsewhere."""
        settings = {}
        for key, default in SAMPLING_DEFAULTS.items():
            value = self.generation.get(key)
            settings[key] = type(default)(default if value is None else value)
        return settings

    @classmethod
    def from_dict(
        cls, raw: dict, generation: dict | None = None, source: str = "config.json"
    ) -> InternLM2Config:
        architectures = raw.get("architectures") or []
        if ARCHITECTURE not in architectures:
            found = ", ".join(architectures) or "none"
            raise InternLM2GraphError(
                f"{source}: architectures is [{found}], expected {ARCHITECTURE}; "
                "internlm2_graph converts InternLM2/InternLM2.5 checkpoints only"
            )
        required = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        missing = [k for k in required if k not in raw]
        if missing:
            raise InternLM2GraphError(f"{source}: missing field(s) {', '.join(missing)}")
        generation = dict(generation or {})
        eos = generation.get("eos_token_id", raw.get("eos_token_id", 2))
        eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
        bos = generation.get("bos_token_id", raw.get("bos_token_id", 1))
        pad = generation.get("pad_token_id", raw.get("pad_token_id"))
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw.get("num_key_value_heads", raw["num_attention_heads"]),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            rope_scaling=_rope_scaling(raw.get("rope_scaling"), source),
            bias=bool(raw.get("bias", True)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=int(bos),
            eos_token_id=tuple(int(e) for e in eos_ids),
            pad_token_id=int(pad if pad is not None else (eos_ids[0] if eos_ids else 0)),
            generation=generation,
            source=source,
        )

    @classmethod
    def from_dir(cls, folder: str | Path) -> InternLM2Config:
        folder = Path(folder)
        path = folder / "config.json"
        if not path.is_file():
            raise InternLM2GraphError(
                f"{path}: not found; --input must be an InternLM2 checkpoint folder "
                "(config.json, *.safetensors, tokenizer.model) or a hub id"
            )
        raw = _read_json(path)
        gen_path = folder / "generation_config.json"
        generation = _read_json(gen_path) if gen_path.is_file() else {}
        return cls.from_dict(raw, generation, source=str(path))


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InternLM2GraphError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise InternLM2GraphError(f"{path}: expected a JSON object")
    return value


def _rope_scaling(raw: dict | None, source: str) -> RopeScaling | None:
    if raw is None:
        return None
    kind = raw.get("type", raw.get("rope_type"))
    if kind not in ROPE_SCALING_TYPES:
        raise InternLM2GraphError(
            f"{source}: rope_scaling type {kind!r} is not supported; "
            f"InternLM2 uses one of {', '.join(ROPE_SCALING_TYPES)} (or null)"
        )
    factor = raw.get("factor")
    if not isinstance(factor, (int, float)) or factor <= 0:
        raise InternLM2GraphError(f"{source}: rope_scaling factor must be a positive number")
    return RopeScaling(kind, float(factor))
