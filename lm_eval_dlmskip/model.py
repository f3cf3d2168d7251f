"""LLaDA in one file: config, RMSNorm, rotary embedding, attention + SwiGLU block, and the model.

The same function as the upstream Hugging Face code (GSAI-ML/LLaDA-8B-Base, ``modeling_llada.py``):
a bidirectional Llama-style encoder with no causal mask. Attribute names follow the upstream
state-dict keys (``blocks.3.q_proj``, ``attn_out``, ``ff_proj``, ``up_proj``, ``ff_out``, ``wte``,
``ln_f``), so loading a checkpoint is a prefix strip. Dream-7B (``modeling_dream.py``) is the same
bidirectional transformer with Qwen2's options: q/k/v biases, rotary in the input dtype, position
ids that skip left padding, and logits shifted by one (position p predicts token p from the hidden
state at p-1); ``LLaDAConfig.from_dict`` maps its config.json onto these options, and loading.py
renames its keys. A skip policy is an argument of ``forward``:

    logits, trace = model(ids, attention_mask, policy=StaticSkip({4, 6, 8}))

For cached decoding (Fast-dLLM) a ``KVCache`` holds every block's keys and values over the whole
canvas: a forward without ``window`` fills it, a forward with ``window`` computes only those
positions and attends to the cache. The block loop lives in ``LLaDA.trunk`` alone; an
``Executor`` decides how each block runs (eagerly here, replayed from CUDA graphs in graphs.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .policies import NO_SKIP, Decision, ForwardBatch, SkipPolicy, SkipTrace

FAMILIES = {"llada": "LLaDA", "dream": "Dream", "hf": "HF causal LM"}  # family -> display name

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


def family_of(raw: dict[str, Any]) -> str:
    """The model family a config.json describes: ``model_type`` "Dream" is Dream; "llada", or no
    model_type with LLaDA's field names, is LLaDA."""
    model_type = raw.get("model_type")
    if model_type == "Dream":
        return "dream"
    if model_type == "llada" or model_type is None and "d_model" in raw:
        return "llada"
    raise ValueError(
        f"config.json: model_type={model_type!r} is not a model lm_eval_dlmskip knows; it runs LLaDA "
        "(model_type 'llada') and Dream (model_type 'Dream') checkpoints"
    )


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """Upstream RMSLayerNorm: normalise in float32, cast back, then scale."""
    y = x.float()
    y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if weight is None else weight * y


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rotary_tables(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin [*positions.shape, head_dim] in float32 for integer positions [L] or [B, L]
    (upstream's tables: one product per angle, as LLaDA's outer product and Qwen2's matmul)."""
    device = positions.device
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float) / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def position_ids(attention_mask: Tensor | None, L: int, cfg: "LLaDAConfig", device: torch.device) -> Tensor:
    """[L] absolute positions, or with ``positions_from_mask`` and padding [B, L] per row: Dream's
    ``cumsum(mask) - 1`` (padding at 1), so a left-padded row is positioned as when alone."""
    if not cfg.positions_from_mask or attention_mask is None:
        return torch.arange(L, device=device)
    return (attention_mask.long().cumsum(-1) - 1).masked_fill_(attention_mask == 0, 1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, full_precision: bool) -> Tensor:
    """x [B, H, L, hd], cos/sin [L, hd] or per row [B, 1, L, hd]: rotate the two halves of each
    head (upstream's rotate_half convention)."""
    t = x.float() if full_precision else x
    half = t.shape[-1] // 2
    rotated = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
    return (t * cos.type_as(t) + rotated * sin.type_as(t)).to(x.dtype)


KV = tuple[Tensor, Tensor] | None  # one block's cached keys and values [B, H_kv, L, hd], or None


def attend(
    q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor | None, cfg: LLaDAConfig,
    kv: KV = None, positions: Tensor | None = None,
) -> Tensor:
    """Bidirectional attention of projected q, k, v [B, W, .] with rotary positions; [B, W, d].

    With ``kv`` the rotated keys and values are first written into the cache at ``positions``
    (slots of the canvas) and the queries attend to the whole cache: a full forward fills it,
    a window forward refreshes its own slots and reads the rest as cached (Fast-dLLM)."""
    B, W, _ = q.shape
    q = q.view(B, W, cfg.n_heads, cfg.head_dim).transpose(1, 2)
    k = k.view(B, W, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
    v = v.view(B, W, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
    q = apply_rotary(q, cos, sin, cfg.rope_full_precision)
    k = apply_rotary(k, cos, sin, cfg.rope_full_precision)
    if kv is not None:
        kv[0].index_copy_(2, positions, k)
        kv[1].index_copy_(2, positions, v)
        k, v = kv
    att = F.scaled_dot_product_attention(
        q, k, v, attn_mask=key_mask, enable_gqa=cfg.n_kv_heads != cfg.n_heads
    )  # no causal mask; key_mask [B, 1, 1, L] hides padding
    return att.transpose(1, 2).reshape(B, W, cfg.n_heads * cfg.head_dim)


def attention_residual(
    x: Tensor, norm_w: Tensor, qkv_w: Tensor, qkv_b: Tensor | None, out_w: Tensor, cos: Tensor, sin: Tensor,
    key_mask: Tensor | None, cfg: LLaDAConfig, kv: KV = None, positions: Tensor | None = None,
) -> Tensor:
    """x + Attention(RMSNorm(x)) with q, k, v from one fused projection (the fast path); ``qkv_b``
    is the fused q/k/v bias (Dream) or None (LLaDA)."""
    kv_dim = cfg.n_kv_heads * cfg.head_dim
    h = F.linear(rms_norm(x, norm_w, cfg.rms_norm_eps), qkv_w, qkv_b)
    q, k, v = h.split((cfg.d_model, kv_dim, kv_dim), dim=-1)
    return x + F.linear(attend(q, k, v, cos, sin, key_mask, cfg, kv, positions), out_w)


def mlp_residual(x: Tensor, norm_w: Tensor, gate_up_w: Tensor, down_w: Tensor, cfg: LLaDAConfig) -> Tensor:
    """x + SwiGLU(RMSNorm(x)) with gate and up from one fused projection (the fast path)."""
    gate, up = F.linear(rms_norm(x, norm_w, cfg.rms_norm_eps), gate_up_w).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, down_w)


@dataclass(frozen=True)
class BlockKernels:
    """The two halves of a block on the fast path: eager, or compiled once for every block."""

    attention: Callable = attention_residual
    mlp: Callable = mlp_residual


EAGER = BlockKernels()
_FUSED_GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("ff_proj", "up_proj")}


class Block(nn.Module):
    """x + Attention(RMSNorm(x)), then + SwiGLU-MLP(RMSNorm(.)); upstream LLaDALlamaBlock.

    After ``fuse_projections`` the q/k/v and gate/up weights live in one buffer each, of which the
    per-name parameters are views: the state-dict keys stay upstream's, and the forward runs one
    matrix product per group. If anything replaces a projection (a LoRA wrapper, an unfused weight),
    the block falls back to the plain per-module path by itself.
    """

    def __init__(self, cfg: LLaDAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
        qkv_bias = cfg.include_bias or cfg.include_qkv_bias
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.layer_norm_with_affine)
        self.q_proj = nn.Linear(d, d, bias=qkv_bias)
        self.k_proj = nn.Linear(d, kv, bias=qkv_bias)
        self.v_proj = nn.Linear(d, kv, bias=qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=cfg.include_bias)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.layer_norm_with_affine)
        self.ff_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=cfg.include_bias)  # gate (SiLU)
        self.up_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=cfg.include_bias)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, d, bias=cfg.include_bias)
        self.kernels = EAGER
        self._fused: dict[str, Tensor] = {}

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor | None, kv: KV = None, positions: Tensor | None = None
    ) -> Tensor:
        fused = self.fused_weights()
        if fused is not None:
            x = self.kernels.attention(
                x, self.attn_norm.weight, fused["qkv"], fused.get("qkv_bias"), self.attn_out.weight, cos, sin, key_mask,
                self.cfg, kv, positions,
            )
            return self.kernels.mlp(x, self.ff_norm.weight, fused["gate_up"], self.ff_out.weight, self.cfg)
        h = self.attn_norm(x)
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        x = x + self.attn_out(attend(q, k, v, cos, sin, key_mask, self.cfg, kv, positions))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))

    def _fused_parts(self) -> list[tuple[str, tuple[str, ...], str]]:
        """(buffer name, projections, parameter) of every fused buffer: the groups' weights, and
        the q/k/v biases where the config has them (Dream)."""
        parts = [(group, names, "weight") for group, names in _FUSED_GROUPS.items()]
        return parts + ([("qkv_bias", _FUSED_GROUPS["qkv"], "bias")] if self.cfg.include_qkv_bias else [])

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Put each group's weights (and q/k/v biases) in one contiguous buffer, the named
        parameters becoming views."""
        cfg = self.cfg
        if cfg.include_bias or not cfg.layer_norm_with_affine:
            return  # the fast path covers LLaDA's and Dream's blocks: affine norms, biases on q/k/v at most
        if any(type(getattr(self, n)) is not nn.Linear for names in _FUSED_GROUPS.values() for n in names):
            return
        for fused, names, param in self._fused_parts():
            modules = [getattr(self, n) for n in names]
            buffer = torch.cat([getattr(m, param) for m in modules])
            start = 0
            for m in modules:
                rows = getattr(m, param).shape[0]
                setattr(m, param, nn.Parameter(buffer[start : start + rows], requires_grad=getattr(m, param).requires_grad))
                start += rows
            self._fused[fused] = buffer

    def fused_weights(self) -> dict[str, Tensor] | None:
        """The fused buffers, while every projection is still a plain Linear viewing its slice."""
        parts = self._fused_parts()
        if len(self._fused) != len(parts):
            return None
        for fused, names, param in parts:
            buffer = self._fused[fused]
            start = buffer.data_ptr()
            for name in names:
                m = getattr(self, name)
                tensor = getattr(m, param) if type(m) is nn.Linear else None
                if tensor is None or tensor.data_ptr() != start:
                    return None
                start += tensor.numel() * tensor.element_size()
        return self._fused

    def _apply(self, fn, recurse: bool = True):
        fused = self.fused_weights() is not None
        super()._apply(fn, recurse)
        if self.fused_weights() is None:  # moving or casting copied each parameter apart: fuse anew
            self._fused = {}
            if fused:
                self.fuse_projections()
        return self


LogitPositions = slice | Tensor | None  # None: all; slice: columns; Tensor: flat indices into B*W


@dataclass
class KVCache:
    """Keys and values of every block over the whole canvas, kept between the forwards of one
    semi-autoregressive block of cached decoding (Fast-dLLM's prefix and dual caches).

    A full forward fills it and records, per block, which rows ran it (``ran``): a row that
    skipped a block there has no keys and values for it, so it skips that block in every window
    forward until the next fill. With ``reuse_decisions`` the window forwards do not ask the skip
    policy at all and run exactly what the fill ran: no router cost and no host read per block
    there. Storage is allocated by the first fill (or lent by an executor).
    """

    k: Tensor | None = None  # [n_layers, B, H_kv, L, hd], rotated
    v: Tensor | None = None
    ran: list[bool | list[bool]] = field(default_factory=list)  # per block, host-known
    reuse_decisions: bool = False

    def allocate(self, cfg: LLaDAConfig, B: int, L: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (cfg.n_layers, B, cfg.n_kv_heads, L, cfg.head_dim)
        if self.k is None or self.k.shape != shape or self.k.dtype != dtype or self.k.device != device:
            self.k = torch.empty(shape, dtype=dtype, device=device)
            self.v = torch.empty(shape, dtype=dtype, device=device)
        self.ran = []


@dataclass
class ForwardContext:
    """What every block of one forward reads besides its input, built once per forward."""

    batch: ForwardBatch  # the computed positions, as the skip policy sees them
    cos: Tensor  # [W, hd] rotary tables at the computed positions ([B, 1, W, hd] with per-row positions)
    sin: Tensor
    key_mask: Tensor | None  # [B, 1, 1, L] bool: real (non-padding) keys; None: no padding
    cache: KVCache | None = None
    positions: Tensor | None = None  # [W] canvas slots the computed positions write in the cache
    filling: bool = False  # a full forward that (re)fills the cache


class Executor:
    """How the block loop runs each step: eagerly, as here, or replayed from CUDA graphs (graphs.py).
    The loop itself is ``LLaDA.trunk``'s, whichever executor runs it."""

    def begin(self, model: "LLaDA", x: Tensor, ctx: ForwardContext) -> tuple[Tensor, ForwardContext]:
        return x, ctx

    def decide(self, layer: int, policy: SkipPolicy, x: Tensor, ctx: ForwardContext) -> Decision:
        return policy.rows_to_run(layer, x, ctx.batch)

    def run(self, layer: int, block: Block, x: Tensor, run: Decision, ctx: ForwardContext) -> Tensor:
        return run_block(block, layer, x, run, ctx)


EAGER_EXECUTOR = Executor()


class LLaDA(nn.Module):
    """Embedding -> blocks (each asked of the skip policy) -> final norm -> LM head."""

    def __init__(self, cfg: LLaDAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.d_model, cfg.rms_norm_eps, cfg.layer_norm_with_affine)
        self.ff_out = None if cfg.weight_tying else nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.include_bias)

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    def fuse_projections(self) -> "LLaDA":
        """One matrix product for q/k/v and one for gate/up in every block (same weights, same keys)."""
        for block in self.blocks:
            block.fuse_projections()
        return self

    def compile_blocks(self) -> "LLaDA":
        """torch.compile the two halves of the block once, shared by every block (opt-in)."""
        kernels = BlockKernels(torch.compile(attention_residual), torch.compile(mlp_residual))
        for block in self.blocks:
            block.kernels = kernels
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    def forward(
        self,
        ids: Tensor,
        attention_mask: Tensor | None = None,
        policy: SkipPolicy = NO_SKIP,
        logits_at: LogitPositions = None,
        cache: KVCache | None = None,
        window: slice | None = None,
        executor: Executor = EAGER_EXECUTOR,
    ) -> tuple[Tensor, SkipTrace]:
        """Logits [B, W, V] of the computed positions (or at ``logits_at`` among them) and the trace
        of the blocks each row ran.

        ``attention_mask`` [B, L] marks real tokens with 1; pass None when no row is padded, so
        attention can take its fastest kernel. With ``cache`` and no ``window`` the forward computes
        every position and fills the cache; with a ``window`` of canvas columns it computes those
        only, attending to the cache for the rest.
        """
        if window is not None and self.cfg.shift_logits:
            raise ValueError(
                f"cached decoding (a window forward) is not supported for {FAMILIES[self.cfg.family]}: its shifted "
                "logits need the hidden state left of the window; use cache=none"
            )
        h, trace = self.trunk(ids, attention_mask, policy, cache=cache, window=window, executor=executor)
        trace.head_positions = head_positions(logits_at, *h.shape[:2], ids.device)
        return self.head(h, logits_at), trace

    def trunk(
        self,
        ids: Tensor,
        attention_mask: Tensor | None = None,
        policy: SkipPolicy = NO_SKIP,
        hidden_states: list[Tensor] | None = None,
        cache: KVCache | None = None,
        window: slice | None = None,
        executor: Executor = EAGER_EXECUTOR,
    ) -> tuple[Tensor, SkipTrace]:
        """Hidden states after the last block (before ``ln_f``); appends each block's input to
        ``hidden_states`` when given."""
        ctx = self.context(ids, attention_mask, cache, window)
        x, ctx = executor.begin(self, self.embed(ids if window is None else ids[:, window]), ctx)
        reuse = ctx.cache is not None and not ctx.filling and ctx.cache.reuse_decisions
        decisions: list[Decision] = []
        for i, block in enumerate(self.blocks):
            if hidden_states is not None:
                hidden_states.append(x)
            if reuse:
                run = ctx.cache.ran[i]
            else:
                run = resolve(executor.decide(i, policy, x, ctx))
                if ctx.filling:
                    ctx.cache.ran.append(run)
                elif ctx.cache is not None:
                    run = both(run, ctx.cache.ran[i])
            x = executor.run(i, block, x, run, ctx)
            decisions.append(run)
        return x, make_trace(decisions, ctx, 0 if reuse else getattr(policy, "routed_layers", 0))

    def context(
        self, ids: Tensor, attention_mask: Tensor | None, cache: KVCache | None = None, window: slice | None = None
    ) -> ForwardContext:
        """Everything a forward's blocks share: the policy's view, rotary tables, key mask, cache slots."""
        cfg = self.cfg
        B, L = ids.shape
        cos, sin = rotary_tables(position_ids(attention_mask, L, cfg, ids.device), cfg.head_dim, cfg.rope_theta)
        if cos.dim() == 3:  # per-row positions: [B, 1, L, hd], broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        key_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        batch = ForwardBatch.of(ids, attention_mask, cfg.mask_token_id)
        if cache is None:
            if window is not None:
                raise ValueError("a window forward needs the KVCache that a full forward filled")
            return ForwardContext(batch, cos, sin, key_mask)
        if window is None:
            cache.allocate(cfg, B, L, self.dtype, ids.device)
            positions = torch.arange(L, device=ids.device)
            return ForwardContext(batch, cos, sin, key_mask, cache, positions, filling=True)
        positions = torch.arange(L, device=ids.device)[window]
        return ForwardContext(batch.window(window), cos[..., window, :], sin[..., window, :], key_mask, cache, positions)

    def embed(self, ids: Tensor) -> Tensor:
        x = self.wte(ids)
        return x * self.cfg.d_model**0.5 if self.cfg.input_emb_norm else x

    def head(self, h: Tensor, logits_at: LogitPositions = None) -> Tensor:
        """Final norm and LM head, only at the positions whose logits are used (with shifted
        logits, from the hidden states one position to their left)."""
        if self.cfg.shift_logits:
            h, logits_at = shifted_source(h, logits_at)
        if isinstance(logits_at, slice):
            h = h[:, logits_at]
        elif logits_at is not None:
            h = h.flatten(0, 1).index_select(0, logits_at)
        h = self.ln_f(h)
        logits = F.linear(h, self.wte.weight) if self.ff_out is None else self.ff_out(h)
        return logits * (1 / math.sqrt(self.cfg.d_model)) if self.cfg.scale_logits else logits

    @torch.no_grad()
    def hidden_states(
        self, ids: Tensor, attention_mask: Tensor | None = None, policy: SkipPolicy = NO_SKIP
    ) -> list[Tensor]:
        """Upstream ``output_hidden_states``: [embeddings, input of block 1, ..., ln_f(last output)]."""
        states: list[Tensor] = []
        h, _ = self.trunk(ids, attention_mask, policy, hidden_states=states)
        states.append(self.ln_f(h))
        return states


def shifted_source(h: Tensor, logits_at: LogitPositions) -> tuple[Tensor, LogitPositions]:
    """Dream's shift (``cat([logits[:, :1], logits[:, :-1]])``) as a choice of hidden states: the
    logits at position p are the head of h at max(p - 1, 0). Returns the hidden states and
    positions to take the head at."""
    W = h.shape[1]
    if logits_at is None:
        return torch.cat([h[:, :1], h[:, :-1]], dim=1), None
    if isinstance(logits_at, slice):
        start, stop, step = logits_at.indices(W)
        if step == 1 and start > 0:
            return h, slice(start - 1, stop - 1)
        columns = (torch.arange(start, stop, step, device=h.device) - 1).clamp_min_(0)
        return h.index_select(1, columns), None
    return h, logits_at - (logits_at % W > 0).long()


def make_trace(decisions: list, ctx: ForwardContext, routed_layers: int) -> SkipTrace:
    """The trace of one forward (its head positions are filled in once the head has run): the
    tokens computed per row and the keys each attended to (the whole canvas in a window forward)."""
    batch = ctx.batch
    B, W = batch.ids.shape
    device = batch.ids.device
    computed = torch.full((B,), W, device=device) if batch.attention_mask is None else batch.attention_mask.sum(1)
    keys = None
    if ctx.cache is not None:
        L = ctx.cache.k.shape[3]
        keys = torch.full((B,), L, device=device) if ctx.key_mask is None else ctx.key_mask.flatten(1).sum(1)
    executed = SkipTrace.from_decisions(decisions, B, device)
    return SkipTrace(executed, computed, computed, batch.masked.sum(1), routed_layers, keys)


def head_positions(logits_at: LogitPositions, B: int, W: int, device: torch.device) -> Tensor:
    """[B] positions per row at which the LM head ran."""
    if logits_at is None:
        return torch.full((B,), W, device=device)
    if isinstance(logits_at, slice):
        return torch.full((B,), len(range(W)[logits_at]), device=device)
    return torch.bincount(logits_at // W, minlength=B)


def resolve(run: Decision) -> Decision | list[bool]:
    """A decision the host can branch on: per-row bools are read back (the one sync of a routed
    block) and collapse to True/False when every row agrees; training's float gates pass through."""
    if isinstance(run, bool) or isinstance(run, Tensor) and run.dtype.is_floating_point:
        return run
    chosen = run if isinstance(run, list) else run.tolist()  # sync: one read per block, every row's decision
    return True if all(chosen) else False if not any(chosen) else chosen


def both(run: Decision | list[bool], allowed: bool | list[bool]) -> Decision | list[bool]:
    """Rows that run a block: those the policy chose, among those the cache allows."""
    if allowed is True or run is False:
        return run
    if allowed is False or run is True:
        return allowed
    return resolve([a and b for a, b in zip(run, allowed)])


def run_block(block: Block, layer: int, x: Tensor, run: Decision | list[bool], ctx: ForwardContext) -> Tensor:
    """Run ``block`` for the rows the policy chose; a skipped row keeps its input unchanged."""
    kv = None if ctx.cache is None else (ctx.cache.k[layer], ctx.cache.v[layer])
    args = (ctx.cos, ctx.sin, ctx.key_mask, kv, ctx.positions)
    if run is True:
        return block(x, *args)
    if run is False:
        return x
    if isinstance(run, Tensor):  # a differentiable gate in [0, 1] (router training)
        return x + run.to(x.dtype)[:, None, None] * (block(x, *args) - x)
    rows = torch.tensor([i for i, c in enumerate(run) if c], device=x.device)
    sub_mask = None if ctx.key_mask is None else ctx.key_mask.index_select(0, rows)
    sub_kv = None if kv is None else (kv[0].index_select(0, rows), kv[1].index_select(0, rows))
    cos, sin = (ctx.cos, ctx.sin) if ctx.cos.dim() == 2 else (ctx.cos.index_select(0, rows), ctx.sin.index_select(0, rows))
    out = block(x.index_select(0, rows), cos, sin, sub_mask, sub_kv, ctx.positions)
    if kv is not None:  # the subset's refreshed keys and values go back into the cache
        kv[0].index_copy_(0, rows, sub_kv[0])
        kv[1].index_copy_(0, rows, sub_kv[1])
    return x.index_copy(0, rows, out)
