"""A checkpoint's ``config.json`` as the native model's configuration: LLaDA's upstream field names,
or Dream's (Qwen2-style), LLaDA2's (``llada2_moe``) and LLaDA-MoE's ones mapped onto the same
options. Every field this implementation cannot honour is named."""

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
class MoEConfig:
    """The mixture-of-experts MLP of the MoE families: which layers have one, the router's rule,
    the routed experts and the shared expert."""

    n_experts: int
    top_k: int
    expert_hidden: int  # width of one routed expert's SwiGLU
    moe_layers: tuple[bool, ...]  # per layer: an MoE MLP (True) or a dense one (False)
    shared_hidden: int = 0  # width of the shared expert's SwiGLU, 0: none
    score: str = "sigmoid"  # "sigmoid" (LLaDA2) or "softmax" (LLaDA-MoE) of the router logits
    n_group: int = 1  # experts in contiguous groups; the topk_group best groups compete (LLaDA2)
    topk_group: int = 1
    bias_in_weights: bool = False  # expert_bias in the weights too (LLaDA-MoE), not only the choice (LLaDA2)
    normalize: bool = True  # top-k weights renormalised to sum 1 (LLaDA2) or used as they are
    scaling: float = 1.0  # routed_scaling_factor
    expert_bias: bool = True  # a per-expert bias steers the choice


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
    layout: str = "llada"  # the checkpoint's key names (loading.py): llada, dream, llada2, lladamoe
    attention_head_dim: int | None = None  # LLaDA2's explicit head_dim; None: d_model / n_heads
    rotary_dim: int | None = None  # partial rotary: only the first rotary_dim dims of a head rotate
    qk_norm: bool = False  # RMSNorm over each head of q and k before rotary (the MoE families)
    attention_out_bias: bool = False  # a bias on the attention output projection alone (LLaDA2 use_bias)
    moe: MoEConfig | None = None

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.d_model // self.n_heads

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and self.moe.moe_layers[layer]

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "LLaDAConfig":
        """Map an upstream ``config.json`` (LLaDA's or Dream's) and name every field this
        implementation cannot honour."""
        layout = layout_of(raw) or family_of(raw)  # family_of names a model of none of ours
        if layout != "llada":
            return {"dream": cls.from_dream_dict, "llada2": cls.from_llada2_dict, "lladamoe": cls.from_lladamoe_dict}[layout](raw)
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
            layout="dream",
        )

    @classmethod
    def from_llada2_dict(cls, raw: dict[str, Any]) -> "LLaDAConfig":
        """LLaDA2's ``llada2_moe`` config.json (LLaDA2.0/2.1 mini and flash): QK-norm, partial rotary,
        a dense MLP in the first ``first_k_dense_replace`` layers, then grouped sigmoid routing over
        routed experts plus a shared expert. Its mask id is not in config.json: ``mask_token_id``
        comes from the tokenizer (loading.py)."""
        _require(raw, ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"), "LLaDA2")
        _refuse_unless(raw, {"hidden_act": ("silu",), "score_function": ("sigmoid",), "norm_topk_prob": (True,),
                             "rope_scaling": (None,)})
        d_model, n_heads, n_layers = raw["hidden_size"], raw["num_attention_heads"], raw["num_hidden_layers"]
        head_dim = raw.get("head_dim") or d_model // n_heads
        experts = raw.get("num_experts", 16)
        moe = None
        if experts is not None:
            first_dense = raw.get("first_k_dense_replace", 0)
            n_group, topk_group = raw.get("n_group", 8), raw.get("topk_group", 4)
            if experts % n_group or not 1 <= topk_group <= n_group:
                raise ValueError(f"config.json: num_experts={experts} must split into n_group={n_group} groups and "
                                 f"topk_group={topk_group} lie in 1..n_group")
            shared = raw.get("num_shared_experts", 0)
            moe = MoEConfig(
                n_experts=experts, top_k=raw.get("num_experts_per_tok", 2), expert_hidden=raw["moe_intermediate_size"],
                moe_layers=tuple(i >= first_dense for i in range(n_layers)),
                shared_hidden=raw["moe_intermediate_size"] * (shared or 0), score="sigmoid", n_group=n_group,
                topk_group=topk_group, bias_in_weights=False, normalize=True,
                scaling=float(raw.get("routed_scaling_factor", 2.5)),
            )
        return cls(
            d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=raw.get("num_key_value_heads") or n_heads,
            mlp_hidden_size=raw["intermediate_size"], vocab_size=raw["vocab_size"],
            max_sequence_length=raw.get("max_position_embeddings", 32768), mask_token_id=raw.get("mask_token_id", -1),
            rope_theta=float(raw.get("rope_theta", 10000.0)), rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            eos_token_id=raw.get("eos_token_id"), pad_token_id=raw.get("pad_token_id"),
            include_qkv_bias=bool(raw.get("use_qkv_bias", False)), weight_tying=bool(raw.get("tie_word_embeddings", False)),
            rope_full_precision=False, dtype=raw.get("torch_dtype") or raw.get("dtype"), family="llada2",
            positions_from_mask=True, layout="llada2", attention_head_dim=head_dim,
            rotary_dim=int(head_dim * raw.get("partial_rotary_factor", 0.5)), qk_norm=bool(raw.get("use_qk_norm", True)),
            attention_out_bias=bool(raw.get("use_bias", True)), moe=moe,
        )

    @classmethod
    def from_lladamoe_dict(cls, raw: dict[str, Any]) -> "LLaDAConfig":
        """LLaDA-MoE-7B-A1B's config.json (``lladamoe``, or ``llada`` with MoE fields): LLaDA's
        bidirectional decoding over OLMoE-style blocks: softmax routing with the expert bias in
        choice and weights, unnormalised top-k weights, per-layer dense or MoE MLPs, an optional
        shared expert, QK-norm per head, partial rotary."""
        _require(raw, ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "num_experts"), "LLaDA-MoE")
        _refuse_unless(raw, {"hidden_act": ("silu",), "clip_qkv": (None,), "rope_scaling": (None,)})
        for name in ("partial_rotary_factor", "shared_expert_intermediate_size"):
            if name not in raw:
                raise ValueError(f"config.json: {name} is missing; LLaDA-MoE's code has no usable default for it")
        d_model, n_heads, n_layers = raw["hidden_size"], raw["num_attention_heads"], raw["num_hidden_layers"]
        frequency = raw.get("moe_layer_freq", 1)
        moe_layers = tuple(bool(f) for f in frequency) if isinstance(frequency, list) else (True,) * n_layers
        if len(moe_layers) != n_layers:
            raise ValueError(f"config.json: moe_layer_freq has {len(moe_layers)} entries for {n_layers} layers")
        head_dim = d_model // n_heads
        moe = MoEConfig(
            n_experts=raw["num_experts"], top_k=raw.get("num_experts_per_tok", 8),
            expert_hidden=raw["expert_intermediate_size"], moe_layers=moe_layers,
            shared_hidden=raw["shared_expert_intermediate_size"] or 0, score="softmax", bias_in_weights=True,
            normalize=False, expert_bias=bool(raw.get("moe_router_enable_expert_bias", False)),
        )
        mask = raw.get("mask_token_id")
        return cls(
            d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=raw.get("num_key_value_heads") or n_heads,
            mlp_hidden_size=raw["dense_intermediate_size"], vocab_size=raw["vocab_size"],
            max_sequence_length=raw.get("max_position_embeddings", 4096), mask_token_id=-1 if mask is None else mask,
            rope_theta=float(raw.get("rope_theta", 10000.0)), rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            eos_token_id=raw.get("eos_token_id"), pad_token_id=raw.get("pad_token_id"),
            include_qkv_bias=bool(raw.get("attention_bias", False)), weight_tying=bool(raw.get("tie_word_embeddings", False)),
            dtype=raw.get("torch_dtype") or raw.get("dtype"), family="llada", layout="lladamoe",
            rotary_dim=int(head_dim * raw["partial_rotary_factor"]), qk_norm=bool(raw.get("qk_layernorm", False)),
            attention_out_bias=bool(raw.get("attention_bias", False)), moe=moe,
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "LLaDAConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


LAYOUT_FAMILY = {"llada": "llada", "lladamoe": "llada", "dream": "dream", "llada2": "llada2"}


def layout_of(raw: dict[str, Any]) -> str | None:
    """The checkpoint layout a config.json describes (its key names and architecture), None for a
    model of none of ours: ``model_type`` "Dream" is Dream; "llada2_moe"/"llada21_moe" LLaDA2;
    "lladamoe", or "llada" with MoE fields (the hub's LLaDA-MoE), LLaDA-MoE; "llada", or none with
    LLaDA's field names, LLaDA."""
    model_type = raw.get("model_type")
    if model_type == "Dream":
        return "dream"
    if model_type in ("llada2_moe", "llada21_moe"):
        return "llada2"
    if model_type == "lladamoe" or model_type == "llada" and "num_experts" in raw and "d_model" not in raw:
        return "lladamoe"
    if model_type == "llada" or model_type is None and "d_model" in raw:
        return "llada"
    return None


def diffusion_family(raw: dict[str, Any]) -> str | None:
    """The diffusion family a config.json describes (how it decodes: llada, dream, llada2), None
    for any other model."""
    layout = layout_of(raw)
    return None if layout is None else LAYOUT_FAMILY[layout]


def family_of(raw: dict[str, Any]) -> str:
    """The model family a config.json describes (``diffusion_family``); any other is an error."""
    family = diffusion_family(raw)
    if family is not None:
        return family
    model_type = raw.get("model_type")
    raise ValueError(
        f"config.json: model_type={model_type!r} is not a model lm_eval_dlmskip knows; it runs LLaDA ('llada'), "
        "LLaDA-MoE ('lladamoe'), Dream ('Dream') and LLaDA2 ('llada2_moe', 'llada21_moe') checkpoints"
    )


def _require(raw: dict[str, Any], names: tuple[str, ...], kind: str) -> None:
    for name in names:
        if name not in raw:
            raise ValueError(f"config.json: required field '{name}' is missing; is this a {kind} checkpoint?")


def _refuse_unless(raw: dict[str, Any], allowed: dict[str, tuple[Any, ...]]) -> None:
    """Name a field whose value this implementation does not compute (absent fields take upstream's default)."""
    for name, values in allowed.items():
        if name in raw and raw[name] not in values and not (name == "rope_scaling" and raw[name] == {}):
            raise ValueError(f"config.json: {name}={raw[name]!r} is not supported (supported: "
                             f"{', '.join(map(repr, values))})")
