"""A checkpoint's ``config.json`` as the native model's configuration: LLaDA's upstream field names,
or Dream's Qwen2-style ones mapped onto the same options. Every field this implementation cannot
honour is named."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

# Upstream config fields whose other values this implementation does not compute.
_REQUIRED_VALUES: dict[str, tuple[Any, ...]] = {
    "block_type": ("llama",),
    "layer_norm_type": ("rms",),
    "activation_type": ("silu",),
    "alibi": (False,),
    "rope": (True,),
    "attention_layer_norm": (False,),
    "block_group_size": (1,),
}


@dataclass(frozen=True)
class LLaDAConfig:
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    mlp_hidden_size: int
    vocab_size: int  # rows of the embedding and of the LM head (upstream `embedding_size`)
    max_sequence_length: int
    mask_token_id: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    include_bias: bool = False
    include_qkv_bias: bool = False
    weight_tying: bool = False
    input_emb_norm: bool = False
    scale_logits: bool = False
    layer_norm_with_affine: bool = True
    rope_full_precision: bool = True
    dtype: str | None = None  # the checkpoint's declared dtype, used by dtype="auto"
    family: str = "llada"  # a key of FAMILIES
    shift_logits: bool = False  # Dream: logits at position p come from the hidden state at p-1 (p=0: itself)
    positions_from_mask: bool = False  # Dream: rotary position ids cumsum(attention_mask)-1 per row

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "LLaDAConfig":
        """Map an upstream ``config.json`` (LLaDA's or Dream's) and name every field this
        implementation cannot honour."""
        if family_of(raw) == "dream":
            return cls.from_dream_dict(raw)
        for name, allowed in _REQUIRED_VALUES.items():
            if name in raw and raw[name] not in allowed:
                raise ValueError(
                    f"config.json: {name}={raw[name]!r} is not supported by lm_eval_dlmskip's LLaDA "
                    f"(supported: {', '.join(map(repr, allowed))})"
                )
        include_bias = bool(raw.get("include_bias", False))
        norm_bias = raw.get("bias_for_layer_norm")
        if (include_bias if norm_bias is None else norm_bias):
            raise ValueError("config.json: layer norms with a bias (bias_for_layer_norm) are not supported")
        for name in ("d_model", "n_layers", "n_heads"):
            if name not in raw:
                raise ValueError(f"config.json: required field '{name}' is missing; is this a LLaDA checkpoint?")
        if raw.get("mask_token_id") is None:
            raise ValueError(
                "config.json: 'mask_token_id' is missing; LLaDA checkpoints declare it (126336 for LLaDA-8B)"
            )
        if raw["d_model"] % raw["n_heads"]:
            raise ValueError(f"config.json: d_model={raw['d_model']} is not divisible by n_heads={raw['n_heads']}")
        n_kv_heads = raw.get("n_kv_heads") or (1 if raw.get("multi_query_attention") else raw["n_heads"])
        if raw["n_heads"] % n_kv_heads:
            raise ValueError(f"config.json: n_heads={raw['n_heads']} is not a multiple of n_kv_heads={n_kv_heads}")
        mlp_hidden = raw.get("mlp_hidden_size") or raw.get("mlp_ratio", 4) * raw["d_model"]
        return cls(
            d_model=raw["d_model"],
            n_layers=raw["n_layers"],
            n_heads=raw["n_heads"],
            n_kv_heads=n_kv_heads,
            mlp_hidden_size=int(mlp_hidden),
            vocab_size=raw.get("embedding_size") or raw["vocab_size"],
            max_sequence_length=raw.get("max_sequence_length", 4096),
            mask_token_id=raw["mask_token_id"],
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            eos_token_id=raw.get("eos_token_id"),
            pad_token_id=raw.get("pad_token_id"),
            include_bias=include_bias,
            include_qkv_bias=bool(raw.get("include_qkv_bias", False)),
            weight_tying=bool(raw.get("weight_tying", False)),
            input_emb_norm=bool(raw.get("input_emb_norm", False)),
            scale_logits=bool(raw.get("scale_logits", False)),
            layer_norm_with_affine=bool(raw.get("layer_norm_with_affine", True)),
            rope_full_precision=bool(raw.get("rope_full_precision", True)),
            dtype=raw.get("torch_dtype") or raw.get("dtype"),
        )

    @classmethod
    def from_dream_dict(cls, raw: dict[str, Any]) -> "LLaDAConfig":
        """Dream's Qwen2-style config.json (``DreamConfig``): q/k/v with biases, o_proj and the MLP
        without; RMSNorm eps 1e-6; rotary applied in the input dtype; shifted logits."""
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
            if name not in raw:
                raise ValueError(f"config.json: required field '{name}' is missing; is this a Dream checkpoint?")
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act={raw['hidden_act']!r} is not supported (supported: 'silu')")
        if raw.get("rope_scaling") not in (None, {}) and (raw["rope_scaling"].get("rope_type") or raw["rope_scaling"].get("type")) != "default":
            raise ValueError(f"config.json: rope_scaling={raw['rope_scaling']!r} is not supported (only the default rotary)")
        if raw.get("use_sliding_window"):
            raise ValueError("config.json: use_sliding_window=true is not supported (Dream attends to every position)")
        if raw.get("mask_token_id") is None:
            raise ValueError("config.json: 'mask_token_id' is missing; Dream checkpoints declare it (151666 for Dream-7B)")
        d_model, n_heads = raw["hidden_size"], raw["num_attention_heads"]
        n_kv_heads = raw.get("num_key_value_heads") or n_heads
        if d_model % n_heads or n_heads % n_kv_heads:
            raise ValueError(
                f"config.json: hidden_size={d_model}, num_attention_heads={n_heads}, num_key_value_heads={n_kv_heads} "
                "must divide evenly"
            )
        return cls(
            d_model=d_model,
            n_layers=raw["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            mlp_hidden_size=raw["intermediate_size"],
            vocab_size=raw["vocab_size"],
            max_sequence_length=raw.get("max_position_embeddings", 32768),
            mask_token_id=raw["mask_token_id"],
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            eos_token_id=raw.get("eos_token_id"),
            pad_token_id=raw.get("pad_token_id"),
            include_qkv_bias=True,
            weight_tying=bool(raw.get("tie_word_embeddings", False)),
            rope_full_precision=False,
            dtype=raw.get("torch_dtype") or raw.get("dtype"),
            family="dream",
            shift_logits=True,
            positions_from_mask=True,
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "LLaDAConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def diffusion_family(raw: dict[str, Any]) -> str | None:
    """The diffusion family a config.json describes, None for any other model: ``model_type``
    "Dream" is Dream; "llada", or no model_type with LLaDA's field names, is LLaDA."""
    model_type = raw.get("model_type")
    if model_type == "Dream":
        return "dream"
    if model_type == "llada" or model_type is None and "d_model" in raw:
        return "llada"
    return None


def family_of(raw: dict[str, Any]) -> str:
    """The model family a config.json describes (``diffusion_family``); any other is an error."""
    family = diffusion_family(raw)
    if family is not None:
        return family
    model_type = raw.get("model_type")
    raise ValueError(
        f"config.json: model_type={model_type!r} is not a model lm_eval_dlmskip knows; it runs LLaDA "
        "(model_type 'llada') and Dream (model_type 'Dream') checkpoints"
    )
