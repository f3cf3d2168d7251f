"""LLaDA in one file: rotary embedding, attention + SwiGLU block, and the model (its config is config.py).

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
positions and attends to the cache. The block loop, the cache and the executors that run each
block (eagerly, or replayed from CUDA graphs in decoding/graphs.py) are execution.py's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..common.families import FAMILIES
from ..common.norms import RMSNorm, rms_norm
from ..skipping.policies import NO_SKIP, ForwardBatch, SkipPolicy, SkipTrace
from .config import LLaDAConfig
from .execution import (
    EAGER_EXECUTOR,
    KV,
    Executor,
    ForwardContext,
    KVCache,
    LogitPositions,
    head_positions,
    run_blocks,
)


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
        return run_blocks(self.blocks, x, policy, ctx, executor, hidden_states)

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
