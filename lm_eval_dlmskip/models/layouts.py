"""Each checkpoint layout's state-dict keys as the native model's parameters.

LLaDA's keys are ours after stripping ``model.transformer.``; Dream's (Qwen2 names) map through a
table; LLaDA2's and LLaDA-MoE's MoE layers store each expert apart, which land as slices of the
stacked expert tensors (moe.py), and LLaDA2's fused ``query_key_value`` splits into q, k, v.
"""

from __future__ import annotations

import re
from typing import Iterator

from torch import Tensor

from .config import LLaDAConfig

Placement = tuple[str, tuple | None, Tensor]  # (our name, index into it or None for the whole, tensor)

_LLADA_PREFIXES = ("model.transformer.", "transformer.")
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_SWIGLU = {"gate_proj": "ff_proj", "up_proj": "up_proj", "down_proj": "ff_out"}
_EXPERT = re.compile(r"experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_TOP = {
    "dream": {"model.embed_tokens": "wte", "model.norm": "ln_f", "lm_head": "ff_out"},
    "lladamoe": {"model.embed_tokens": "wte", "model.norm": "ln_f", "lm_head": "ff_out"},
    "llada2": {"model.word_embeddings": "wte", "model.norm": "ln_f", "lm_head": "ff_out"},
}
_BLOCK = {  # module names inside a layer, dense MLP included
    "dream": {
        "self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj",
        "self_attn.o_proj": "attn_out", "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj",
        "mlp.down_proj": "ff_out", "input_layernorm": "attn_norm", "post_attention_layernorm": "ff_norm",
    },
    "lladamoe": {
        "self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj",
        "self_attn.o_proj": "attn_out", "self_attn.q_norm": "q_norm", "self_attn.k_norm": "k_norm",
        "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "ff_out",
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ff_norm", "mlp.gate": "moe.gate_linear",
        **{f"shared_expert.{k}": f"moe.shared.{v}" for k, v in _SWIGLU.items()},
    },
    "llada2": {
        "attention.dense": "attn_out", "attention.query_layernorm": "q_norm", "attention.key_layernorm": "k_norm",
        "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "ff_out",
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ff_norm", "mlp.gate": "moe.gate_linear",
        **{f"mlp.shared_experts.{k}": f"moe.shared.{v}" for k, v in _SWIGLU.items()},
    },
}
_EXPERT_PREFIX = {"lladamoe": "mlp.", "llada2": "mlp."}
_BIAS = {"lladamoe": "mlp.expert_bias", "llada2": "mlp.gate.expert_bias"}


def stacked_shapes(cfg: LLaDAConfig) -> dict[str, tuple[int, ...]]:
    """The stacked expert tensors of one MoE block, by parameter name (moe.py's layout)."""
    moe = cfg.moe
    return {"moe.gate_up": (moe.n_experts, 2 * moe.expert_hidden, cfg.d_model),
            "moe.down": (moe.n_experts, cfg.d_model, moe.expert_hidden)}


def dream_name(name: str) -> str:
    """Our parameter name as a Dream checkpoint (Qwen2's names) spells it: the inverse of
    ``placements`` for the dream layout, for writing one (``dlmskip demo --family dream``)."""
    module, _, param = name.rpartition(".")
    top = {ours: theirs for theirs, ours in _TOP["dream"].items()}
    if module in top:
        return f"{top[module]}.{param}"
    _, layer, inner = module.split(".", 2)  # blocks.<i>.<module>
    block = {ours: theirs for theirs, ours in _BLOCK["dream"].items()}
    return f"model.layers.{layer}.{block[inner]}.{param}"


def placements(key: str, tensor: Tensor, cfg: LLaDAConfig) -> Iterator[Placement]:
    """Where an upstream tensor goes among our parameters (an unknown key is kept under its own
    name, to be reported as unexpected)."""
    layout = cfg.layout
    if layout == "llada":
        yield next((key[len(p) :] for p in _LLADA_PREFIXES if key.startswith(p)), key), None, tensor
        return
    module, _, param = key.rpartition(".")
    if module in _TOP[layout]:
        yield f"{_TOP[layout][module]}.{param}", None, tensor
        return
    layer = _LAYER.fullmatch(key)
    if layer is None:
        yield key, None, tensor
        return
    prefix, inner = f"blocks.{layer.group(1)}.", layer.group(2)
    inner_module, _, param = inner.rpartition(".")
    if inner == _BIAS.get(layout):
        yield prefix + "moe.expert_bias", None, tensor
    elif layout == "llada2" and inner_module == "attention.query_key_value":
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.split((q, kv, kv))):
            yield f"{prefix}{name}.{param}", None, part
    elif (expert := _EXPERT.fullmatch(inner.removeprefix(_EXPERT_PREFIX.get(layout, "")))) is not None:
        e, projection = int(expert.group(1)), expert.group(2)
        h = cfg.moe.expert_hidden
        if projection == "down_proj":
            yield prefix + "moe.down", (e,), tensor
        else:
            yield prefix + "moe.gate_up", (e, slice(0, h) if projection == "gate_proj" else slice(h, 2 * h)), tensor
    elif inner_module in _BLOCK[layout]:
        name = _BLOCK[layout][inner_module]
        yield (prefix + "moe.gate", None, tensor) if name == "moe.gate_linear" else (f"{prefix}{name}.{param}", None, tensor)
    else:
        yield key, None, tensor
