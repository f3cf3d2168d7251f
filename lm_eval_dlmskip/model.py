"""LLaDA in one file: config, RMSNorm, rotary embedding, attention + SwiGLU block, and the model.

The same function as the upstream Hugging Face code (GSAI-ML/LLaDA-8B-Base, ``modeling_llada.py``):
a bidirectional Llama-style encoder with no causal mask. Attribute names follow the upstream
state-dict keys (``blocks.3.q_proj``, ``attn_out``, ``ff_proj``, ``up_proj``, ``ff_out``, ``wte``,
``ln_f``), so loading a checkpoint is a prefix strip. A skip policy is an argument of ``forward``:

    logits, trace = model(ids, attention_mask, policy=StaticSkip({4, 6, 8}))
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .policies import NO_SKIP, Decision, ForwardBatch, SkipPolicy, SkipTrace

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

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "LLaDAConfig":
        """Map an upstream ``config.json`` and name every field this implementation cannot honour."""
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
    def from_json(cls, path: str | Path) -> "LLaDAConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


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


def rotary_tables(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos, sin [L, head_dim] in float32 for absolute positions 0..L-1 (upstream's tables)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float), inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, full_precision: bool) -> Tensor:
    """x [B, H, L, hd]: rotate the two halves of each head (upstream's rotate_half convention)."""
    t = x.float() if full_precision else x
    half = t.shape[-1] // 2
    rotated = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
    return (t * cos.type_as(t) + rotated * sin.type_as(t)).to(x.dtype)


def attend(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor | None, cfg: LLaDAConfig) -> Tensor:
    """Bidirectional attention of projected q, k, v [B, L, .] with rotary positions; [B, L, d]."""
    B, L, _ = q.shape
    q = q.view(B, L, cfg.n_heads, cfg.head_dim).transpose(1, 2)
    k = k.view(B, L, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
    v = v.view(B, L, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
    q = apply_rotary(q, cos, sin, cfg.rope_full_precision)
    k = apply_rotary(k, cos, sin, cfg.rope_full_precision)
    att = F.scaled_dot_product_attention(
        q, k, v, attn_mask=key_mask, enable_gqa=cfg.n_kv_heads != cfg.n_heads
    )  # no causal mask; key_mask [B, 1, 1, L] hides padding
    return att.transpose(1, 2).reshape(B, L, cfg.n_heads * cfg.head_dim)


def attention_residual(
    x: Tensor, norm_w: Tensor, qkv_w: Tensor, out_w: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor | None,
    cfg: LLaDAConfig,
) -> Tensor:
    """x + Attention(RMSNorm(x)) with q, k, v from one fused projection (the fast path)."""
    kv = cfg.n_kv_heads * cfg.head_dim
    q, k, v = F.linear(rms_norm(x, norm_w, cfg.rms_norm_eps), qkv_w).split((cfg.d_model, kv, kv), dim=-1)
    return x + F.linear(attend(q, k, v, cos, sin, key_mask, cfg), out_w)


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

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor | None) -> Tensor:
        fused = self.fused_weights()
        if fused is not None:
            x = self.kernels.attention(x, self.attn_norm.weight, fused["qkv"], self.attn_out.weight, cos, sin, key_mask, self.cfg)
            return self.kernels.mlp(x, self.ff_norm.weight, fused["gate_up"], self.ff_out.weight, self.cfg)
        h = self.attn_norm(x)
        x = x + self.attn_out(attend(self.q_proj(h), self.k_proj(h), self.v_proj(h), cos, sin, key_mask, self.cfg))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Put each group's weights in one contiguous buffer, the named parameters becoming views."""
        cfg = self.cfg
        if cfg.include_bias or cfg.include_qkv_bias or not cfg.layer_norm_with_affine:
            return  # the fast path covers LLaDA's bias-free, affine-norm blocks only
        for group, names in _FUSED_GROUPS.items():
            modules = [getattr(self, n) for n in names]
            if any(type(m) is not nn.Linear for m in modules):
                return
            buffer = torch.cat([m.weight for m in modules])
            start = 0
            for m in modules:
                rows = m.weight.shape[0]
                m.weight = nn.Parameter(buffer[start : start + rows], requires_grad=m.weight.requires_grad)
                start += rows
            self._fused[group] = buffer

    def fused_weights(self) -> dict[str, Tensor] | None:
        """The fused buffers, while every projection is still a plain Linear viewing its slice."""
        if len(self._fused) != len(_FUSED_GROUPS):
            return None
        for group, names in _FUSED_GROUPS.items():
            buffer = self._fused[group]
            start = buffer.data_ptr()
            for name in names:
                m = getattr(self, name)
                if type(m) is not nn.Linear or m.weight.data_ptr() != start:
                    return None
                start += m.weight.numel() * m.weight.element_size()
        return self._fused

    def _apply(self, fn, recurse: bool = True):
        fused = self.fused_weights() is not None
        super()._apply(fn, recurse)
        if self.fused_weights() is None:  # moving or casting copied each parameter apart: fuse anew
            self._fused = {}
            if fused:
                self.fuse_projections()
        return self


LogitPositions = slice | Tensor | None  # None: all; slice: columns; Tensor: flat indices into B*L


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
    ) -> tuple[Tensor, SkipTrace]:
        """Logits [B, L, V] (or at ``logits_at`` only) and the trace of the blocks each row ran.

        ``attention_mask`` [B, L] marks real tokens with 1; pass None when no row is padded, so
        attention can take its fastest kernel.
        """
        h, trace = self.trunk(ids, attention_mask, policy)
        trace.head_positions = head_positions(logits_at, *ids.shape, ids.device)
        return self.head(h, logits_at), trace

    def trunk(
        self,
        ids: Tensor,
        attention_mask: Tensor | None = None,
        policy: SkipPolicy = NO_SKIP,
        hidden_states: list[Tensor] | None = None,
    ) -> tuple[Tensor, SkipTrace]:
        """Hidden states after the last block (before ``ln_f``); appends each block's input to
        ``hidden_states`` when given."""
        cfg = self.cfg
        x = self.embed(ids)
        cos, sin = rotary_tables(ids.shape[1], cfg.head_dim, cfg.rope_theta, ids.device)
        key_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        batch = ForwardBatch.of(ids, attention_mask, cfg.mask_token_id)
        decisions: list[Decision] = []
        for i, block in enumerate(self.blocks):
            if hidden_states is not None:
                hidden_states.append(x)
            run = policy.rows_to_run(i, x, batch)
            x = _run_block(block, x, run, cos, sin, key_mask)
            decisions.append(run)
        return x, make_trace(decisions, batch, policy)

    def embed(self, ids: Tensor) -> Tensor:
        x = self.wte(ids)
        return x * self.cfg.d_model**0.5 if self.cfg.input_emb_norm else x

    def head(self, h: Tensor, logits_at: LogitPositions = None) -> Tensor:
        """Final norm and LM head, only at the positions whose logits are used."""
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


def make_trace(decisions: list, batch: ForwardBatch, policy: SkipPolicy) -> SkipTrace:
    """The trace of one forward (its head positions are filled in once the head has run)."""
    B, L = batch.ids.shape
    device = batch.ids.device
    seq_lens = torch.full((B,), L, device=device) if batch.attention_mask is None else batch.attention_mask.sum(1)
    executed = SkipTrace.from_decisions(decisions, B, device)
    return SkipTrace(executed, seq_lens, seq_lens, batch.masked.sum(1), getattr(policy, "routed_layers", 0))


def head_positions(logits_at: LogitPositions, B: int, L: int, device: torch.device) -> Tensor:
    """[B] positions per row at which the LM head ran."""
    if logits_at is None:
        return torch.full((B,), L, device=device)
    if isinstance(logits_at, slice):
        return torch.full((B,), len(range(L)[logits_at]), device=device)
    return torch.bincount(logits_at // L, minlength=B)


def _run_block(block: Block, x: Tensor, run: Decision, cos: Tensor, sin: Tensor, key_mask: Tensor | None) -> Tensor:
    """Run ``block`` for the rows the policy chose; a skipped row keeps its input unchanged."""
    if run is True:
        return block(x, cos, sin, key_mask)
    if run is False:
        return x
    if run.dtype.is_floating_point:  # a differentiable gate in [0, 1] (router training)
        return x + run.to(x.dtype)[:, None, None] * (block(x, cos, sin, key_mask) - x)
    chosen = run.tolist()  # sync: one read per block, the decision of every row
    if all(chosen):
        return block(x, cos, sin, key_mask)
    if not any(chosen):
        return x
    rows = torch.tensor([i for i, c in enumerate(chosen) if c], device=x.device)
    sub_mask = None if key_mask is None else key_mask.index_select(0, rows)
    return x.index_copy(0, rows, block(x.index_select(0, rows), cos, sin, sub_mask))
