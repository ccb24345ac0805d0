"""Qwen3 model configuration read from a Hugging Face ``config.json``.

Only the dense Qwen3 family (``Qwen3ForCausalLM``: Qwen3 0.6B-32B, TIM-8b) is supported. Anything the
model code does not implement is refused with an error naming the field and its value, rather than
being silently ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    model_validator,
)

from timjax.base.errors import TimjaxError


class ConfigError(TimjaxError, ValueError):
    """A config.json that timjax cannot load; the message names the file and the field."""


def _show(value: Any) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def condense(e: ValidationError, rename: dict[str, str] | None = None) -> str:
    """A pydantic ValidationError as one line naming the field and its value (no URL, no dump)."""
    errors = e.errors(include_url=False)
    first = errors[0]
    loc = str(first["loc"][0]) if first["loc"] else ""  # every field is top level; deeper parts are union arms
    loc = (rename or {}).get(loc, loc)
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if not loc:  # a model-level check: the message names the fields itself
        return f"{msg}{more}"
    return f"field {loc}={_show(first.get('input'))}: {msg}{more}"


class Qwen3Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # strict ints: a JSON 32.0, "32" or true is a broken config, not a size; sizes stay int32 on the device
    vocab_size: int = Field(gt=0, le=2**31 - 1, strict=True)
    hidden_size: int = Field(gt=0, le=2**20, strict=True)
    intermediate_size: int = Field(gt=0, le=2**22, strict=True)
    num_hidden_layers: int = Field(gt=0, le=4096, strict=True)
    num_attention_heads: int = Field(gt=0, le=4096, strict=True)
    num_key_value_heads: int = Field(gt=0, le=4096, strict=True)
    head_dim: int = Field(gt=0, le=4096, strict=True)
    rms_norm_eps: float = Field(1e-6, gt=0, lt=1, allow_inf_nan=False, strict=True)
    rope_theta: float = Field(1_000_000.0, gt=0, allow_inf_nan=False, strict=True)
    max_position_embeddings: int = Field(40_960, gt=0, le=2**31 - 1, strict=True)
    tie_word_embeddings: bool = Field(False, strict=True)
    bos_token_id: int | None = Field(None, ge=0, strict=True)
    # a tuple keeps the config hashable (jit static arg)
    eos_token_id: Annotated[int, Strict()] | tuple[Annotated[int, Strict()], ...] | None = None
    torch_dtype: str = "bfloat16"

    @model_validator(mode="after")
    def _runnable(self) -> "Qwen3Config":
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (rotate-half RoPE)")
        for t in self.eos_token_ids:
            if isinstance(t, bool) or t < 0:
                raise ValueError(f"eos_token_id={self.eos_token_id!r} must be token ids >= 0")
        return self

    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def num_params(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        hq, hkv, hd = self.num_attention_heads, self.num_key_value_heads, self.head_dim
        per_layer = d * hd * (hq + 2 * hkv) + hq * hd * d + 3 * d * f + 2 * d + 2 * hd
        return v * d * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * per_layer + d

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "Qwen3Config":
        """Validate a Hugging Face Qwen3 config dict; ``source`` names the file in errors."""

        def fail(field: str, value: Any, why: str) -> ConfigError:
            return ConfigError(f"{source}: unsupported {field}={value!r}: {why}")

        def typed(field: str, kind: type, what: str):
            value = raw.get(field)
            if value is not None and not isinstance(value, kind):
                raise ConfigError(f"{source}: field {field}={_show(value)}: expected {what}")
            return value

        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object of config fields, got {type(raw).__name__}")
        archs = typed("architectures", list, "a list of class names") or []
        model_type = raw.get("model_type")
        if model_type != "qwen3" or (archs and "Qwen3ForCausalLM" not in archs):
            field, value = ("architectures", archs) if archs else ("model_type", model_type)
            raise fail(field, value, "timjax supports the dense Qwen3ForCausalLM family only")
        if raw.get("hidden_act", "silu") != "silu":
            raise fail("hidden_act", raw["hidden_act"], "Qwen3 uses silu")
        if raw.get("attention_bias", False):
            raise fail("attention_bias", raw["attention_bias"], "Qwen3 checkpoints have no attention bias")
        if raw.get("use_sliding_window", False):
            raise fail("use_sliding_window", raw["use_sliding_window"], "sliding-window attention is not implemented")
        for i, kind in enumerate(typed("layer_types", list, "a list") or []):
            if kind != "full_attention":
                raise fail(f"layer_types[{i}]", kind, "only full_attention layers are implemented")

        # transformers >= 5 writes rope_parameters; hub configs carry rope_theta / rope_scaling.
        rope = typed("rope_parameters", dict, "an object") or {}
        scaling = typed("rope_scaling", dict, "an object or null")
        if scaling:
            rope_type = scaling.get("rope_type", scaling.get("type", "default"))
            if rope_type != "default":
                raise fail("rope_scaling.rope_type", rope_type, "only default RoPE is implemented")
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default":
            raise fail("rope_parameters.rope_type", rope_type, "only default RoPE is implemented")
        theta = rope.get("rope_theta", raw.get("rope_theta"))
        if theta is None:
            raise ConfigError(f"{source}: missing field rope_theta (neither rope_parameters.rope_theta nor rope_theta)")

        required = [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "head_dim",
        ]
        for name in required:
            if raw.get(name) is None:
                raise ConfigError(f"{source}: missing field {name}")
        eos = raw.get("eos_token_id")
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
        fields = dict(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw["num_attention_heads"]
            if raw.get("num_key_value_heads") is None
            else raw["num_key_value_heads"],
            head_dim=raw["head_dim"],
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            max_position_embeddings=raw.get("max_position_embeddings", 40_960),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            torch_dtype=str(dtype),
        )
        try:
            return cls(**fields)
        except ValidationError as e:
            where = {"rope_theta": "rope_parameters.rope_theta"} if "rope_theta" in rope else None
            raise ConfigError(f"{source}: {condense(e, where)}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "Qwen3Config":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:  # permission denied, a directory, an I/O error: say which and where
            raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
        return cls.from_hf_dict(raw, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers' Qwen3ForCausalLM loads (both the v4 and v5 spellings of RoPE)."""
        return {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": False,
            "sliding_window": None,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "torch_dtype": self.torch_dtype,
        }
