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

import logging
import math
import time
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
from .moe import MoE

log = logging.getLogger(__name__)


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
    """x [B, H, L, hd], cos/sin [L, r] or per row [B, 1, L, r]: rotate the two halves of the first
    r dims of each head (upstream's rotate_half convention); with partial rotary (r < hd, the MoE
    families) the other dims pass unchanged."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat((apply_rotary(x[..., :r], cos, sin, full_precision), x[..., r:]), dim=-1)
    t = x.float() if full_precision else x
    half = t.shape[-1] // 2
    rotated = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
    return (t * cos.type_as(t) + rotated * sin.type_as(t)).to(x.dtype)


def attend(
    q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor | None, cfg: LLaDAConfig,
    kv: KV = None, positions: Tensor | None = None, q_norm: Tensor | None = None, k_norm: Tensor | None = None,
) -> Tensor:
    """Attention of projected q, k, v [B, W, .] with rotary positions; [B, W, H * hd]. No causal
    mask: ``key_mask`` [B, 1, 1 or W, K] hides padding (and later blocks of a block-causal model).

    With ``kv`` the rotated keys and values are first written into the cache at ``positions``
    (slots of the canvas) and the queries attend to the whole cache: a full forward fills it,
    a window forward refreshes its own slots and reads the rest as cached (Fast-dLLM). With
    ``q_norm``/``k_norm`` (the MoE families) each head of q and k is RMS-normalised before rotary."""
    B, W, _ = q.shape
    q = q.view(B, W, cfg.n_heads, cfg.head_dim).transpose(1, 2)
    k = k.view(B, W, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
    v = v.view(B, W, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, cfg.rms_norm_eps), rms_norm(k, k_norm, cfg.rms_norm_eps)
    q = apply_rotary(q, cos, sin, cfg.rope_full_precision)
    k = apply_rotary(k, cos, sin, cfg.rope_full_precision)
    if kv is not None:
        kv[0].index_copy_(2, positions, k)
        kv[1].index_copy_(2, positions, v)
        k, v = kv
    att = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, enable_gqa=cfg.n_kv_heads != cfg.n_heads)
    return att.transpose(1, 2).reshape(B, W, cfg.n_heads * cfg.head_dim)


def attention_residual(
    x: Tensor, norm_w: Tensor, qkv_w: Tensor, qkv_b: Tensor | None, out_w: Tensor, out_b: Tensor | None,
    q_norm: Tensor | None, k_norm: Tensor | None, cos: Tensor, sin: Tensor, key_mask: Tensor | None,
    cfg: LLaDAConfig, kv: KV = None, positions: Tensor | None = None,
) -> Tensor:
    """x + Attention(RMSNorm(x)) with q, k, v from one fused projection (the fast path); ``qkv_b``
    is the fused q/k/v bias (Dream, LLaDA2 with use_qkv_bias) or None."""
    kv_dim = cfg.n_kv_heads * cfg.head_dim
    h = F.linear(rms_norm(x, norm_w, cfg.rms_norm_eps), qkv_w, qkv_b)
    q, k, v = h.split((cfg.n_heads * cfg.head_dim, kv_dim, kv_dim), dim=-1)
    return x + F.linear(attend(q, k, v, cos, sin, key_mask, cfg, kv, positions, q_norm, k_norm), out_w, out_b)


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


class Compiled:
    """``torch.compile(fn)`` that logs how long each new shape took to compile and, when compiling
    fails, says so once and runs ``fn`` eagerly from then on (the same function, so the same
    results). Only compiler errors fall back; an error of the computation itself is raised."""

    def __init__(self, fn: Callable) -> None:
        self.fn, self.compiled = fn, torch.compile(fn)
        self.shapes: set[tuple] = set()

    def __call__(self, x: Tensor, *args):
        if self.compiled is None:
            return self.fn(x, *args)
        key = (tuple(x.shape), x.dtype)
        if key in self.shapes:
            return self.compiled(x, *args)
        tic = time.perf_counter()
        try:
            out = self.compiled(x, *args)
        except torch._dynamo.exc.TorchDynamoException as err:  # the compiler failed, not the computation
            log.warning("torch.compile of %s failed (%s); running it eagerly from now on (compile=False skips the "
                        "attempt)", self.fn.__name__, str(err).splitlines()[0])
            self.compiled = None
            return self.fn(x, *args)
        self.shapes.add(key)
        log.info("compiled %s for %s in %.1f s", self.fn.__name__, list(x.shape), time.perf_counter() - tic)
        return out


_FUSED_GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("ff_proj", "up_proj")}


class Block(nn.Module):
    """x + Attention(RMSNorm(x)), then + MLP(RMSNorm(.)); upstream LLaDALlamaBlock. The MLP is a
    SwiGLU, or in an MoE layer of the MoE families the routed and shared experts (moe.py).

    After ``fuse_projections`` the q/k/v and gate/up weights live in one buffer each, of which the
    per-name parameters are views: the state-dict keys stay upstream's, and the forward runs one
    matrix product per group. If anything replaces a projection (a LoRA wrapper, an unfused weight),
    the block falls back to the plain per-module path by itself.
    """

    def __init__(self, cfg: LLaDAConfig, layer: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        d, q_dim, kv = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        qkv_bias = cfg.include_bias or cfg.include_qkv_bias
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.layer_norm_with_affine)
        self.q_proj = nn.Linear(d, q_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d, kv, bias=qkv_bias)
        self.v_proj = nn.Linear(d, kv, bias=qkv_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.attn_out = nn.Linear(q_dim, d, bias=cfg.include_bias or cfg.attention_out_bias)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.layer_norm_with_affine)
        self.moe = MoE(cfg) if cfg.is_moe_layer(layer) else None
        if self.moe is None:
            self.ff_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=cfg.include_bias)  # gate (SiLU)
            self.up_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=cfg.include_bias)
            self.ff_out = nn.Linear(cfg.mlp_hidden_size, d, bias=cfg.include_bias)
        self.kernels = EAGER
        self._fused: dict[str, Tensor] = {}

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor | None, kv: KV = None, positions: Tensor | None = None
    ) -> Tensor:
        fused = self.fused_weights()
        q_norm = None if self.q_norm is None else self.q_norm.weight
        k_norm = None if self.k_norm is None else self.k_norm.weight
        if fused is not None:
            x = self.kernels.attention(
                x, self.attn_norm.weight, fused["qkv"], fused.get("qkv_bias"), self.attn_out.weight, self.attn_out.bias,
                q_norm, k_norm, cos, sin, key_mask, self.cfg, kv, positions,
            )
        else:
            h = self.attn_norm(x)
            q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
            x = x + self.attn_out(attend(q, k, v, cos, sin, key_mask, self.cfg, kv, positions, q_norm, k_norm))
        if self.moe is not None:
            return x + self.moe(self.ff_norm(x))
        if fused is not None:
            return self.kernels.mlp(x, self.ff_norm.weight, fused["gate_up"], self.ff_out.weight, self.cfg)
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))

    def write_kv(self, x: Tensor, cos: Tensor, sin: Tensor, kv: tuple[Tensor, Tensor], positions: Tensor) -> None:
        """Write the keys and values this block would write for input ``x`` into ``kv`` at
        ``positions``, without running it: a block's keys and values depend on its input alone, so
        a row that skips the block in a cache fill still gets exactly the ones running it would have
        written (cached decoding with decisions per step, generate.py)."""
        B, W, _ = x.shape
        cfg = self.cfg
        h = self.attn_norm(x)
        k = self.k_proj(h).view(B, W, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, W, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        if self.k_norm is not None:
            k = rms_norm(k, self.k_norm.weight, cfg.rms_norm_eps)
        kv[0].index_copy_(2, positions, apply_rotary(k, cos, sin, cfg.rope_full_precision))
        kv[1].index_copy_(2, positions, v)

    def _fused_parts(self) -> list[tuple[str, tuple[str, ...], str]]:
        """(buffer name, projections, parameter) of every fused buffer: the groups' weights (gate/up
        of a dense MLP), and the q/k/v biases where the config has them (Dream)."""
        groups = {k: v for k, v in _FUSED_GROUPS.items() if k == "qkv" or self.moe is None}
        parts = [(group, names, "weight") for group, names in groups.items()]
        return parts + ([("qkv_bias", _FUSED_GROUPS["qkv"], "bias")] if self.cfg.include_qkv_bias else [])

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Put each group's weights (and q/k/v biases) in one contiguous buffer, the named
        parameters becoming views."""
        cfg = self.cfg
        if cfg.include_bias or not cfg.layer_norm_with_affine:
            return  # the fast path covers LLaDA's and Dream's blocks: affine norms, biases on q/k/v at most
        if any(type(getattr(self, n)) is not nn.Linear for _, names, _ in self._fused_parts() for n in names):
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
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.d_model, cfg.rms_norm_eps, cfg.layer_norm_with_affine)
        self.ff_out = None if cfg.weight_tying else nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.include_bias)
        self.block_devices: tuple[torch.device, ...] | None = None  # set when split over devices (placement.py)

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    def fuse_projections(self) -> "LLaDA":
        """One matrix product for q/k/v and one for gate/up in every block (same weights, same keys)."""
        for block in self.blocks:
            block.fuse_projections()
        return self

    def compile_blocks(self) -> "LLaDA":
        """torch.compile the two halves of the block once, shared by every block (the default on a
        GPU); a compilation that fails falls back to the eager halves with one warning."""
        kernels = BlockKernels(Compiled(attention_residual), Compiled(mlp_residual))
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
        block_length: int | None = None,
    ) -> tuple[Tensor, SkipTrace]:
        """Logits [B, W, V] of the computed positions (or at ``logits_at`` among them) and the trace
        of the blocks each row ran.

        ``attention_mask`` [B, L] marks real tokens with 1; pass None when no row is padded, so
        attention can take its fastest kernel. With ``cache`` and no ``window`` the forward computes
        every position and fills the cache; with a ``window`` of canvas columns it computes those
        only, attending to the cache for the rest. With ``block_length`` (LLaDA2) attention is
        block-causal: a position sees its own block and the blocks before it (counted from column 0);
        a ``window`` forward then writes its keys and values into the (exact) cache and attends to
        the columns before the window's end.
        """
        if window is not None and self.cfg.shift_logits:
            raise ValueError(
                f"cached decoding (a window forward) is not supported for {FAMILIES[self.cfg.family]}: its shifted "
                "logits need the hidden state left of the window; use cache=none"
            )
        h, trace = self.trunk(ids, attention_mask, policy, cache=cache, window=window, executor=executor,
                              block_length=block_length)
        trace.head_positions = head_positions(logits_at, *h.shape[:2], ids.device)
        if self.block_devices is not None:  # split over devices: the head's device, logits back on the input's
            logits_at = logits_at.to(self.ln_f.weight.device) if isinstance(logits_at, Tensor) else logits_at
            return self.head(h.to(self.ln_f.weight.device), logits_at).to(ids.device), trace
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
        block_length: int | None = None,
    ) -> tuple[Tensor, SkipTrace]:
        """Hidden states after the last block (before ``ln_f``); appends each block's input to
        ``hidden_states`` when given."""
        ctx = self.context(ids, attention_mask, cache, window, block_length)
        x, ctx = executor.begin(self, self.embed(ids if window is None else ids[:, window]), ctx)
        return run_blocks(self.blocks, x, policy, ctx, executor, hidden_states, self.block_devices)

    def context(
        self, ids: Tensor, attention_mask: Tensor | None, cache: KVCache | None = None, window: slice | None = None,
        block_length: int | None = None,
    ) -> ForwardContext:
        """Everything a forward's blocks share: the policy's view, rotary tables, key mask, cache slots."""
        cfg = self.cfg
        B, L = ids.shape
        cos, sin = rotary_tables(position_ids(attention_mask, L, cfg, ids.device), cfg.rotary_dim or cfg.head_dim,
                                 cfg.rope_theta)
        if cos.dim() == 3:  # per-row positions: [B, 1, L, hd], broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        key_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        batch = ForwardBatch.of(ids, attention_mask, cfg.mask_token_id)
        if block_length is not None:
            return block_causal_context(batch, cos, sin, attention_mask, cache, window, block_length, cfg, self.dtype,
                                        self.block_devices)
        if cache is None:
            if window is not None:
                raise ValueError("a window forward needs the KVCache that a full forward filled")
            return ForwardContext(batch, cos, sin, key_mask)
        if window is None:
            cache.allocate(cfg, B, L, self.dtype, ids.device, self.block_devices)
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
        self, ids: Tensor, attention_mask: Tensor | None = None, policy: SkipPolicy = NO_SKIP,
        block_length: int | None = None,
    ) -> list[Tensor]:
        """Upstream ``output_hidden_states``: [embeddings, input of block 1, ..., ln_f(last output)]."""
        states: list[Tensor] = []
        h, _ = self.trunk(ids, attention_mask, policy, hidden_states=states, block_length=block_length)
        states.append(self.ln_f(h.to(self.ln_f.weight.device)))
        return states


def block_causal_context(
    batch: ForwardBatch, cos: Tensor, sin: Tensor, attention_mask: Tensor | None, cache: KVCache | None,
    window: slice | None, block_length: int, cfg: LLaDAConfig, dtype: torch.dtype,
    block_devices: tuple[torch.device, ...] | None = None,
) -> ForwardContext:
    """The context of a block-causal forward (LLaDA2): each computed column attends to the real
    columns of its block and the blocks before it; with a cache, the forward computes ``window``,
    writes its keys and values and attends to the columns before the window's end."""
    ids = batch.ids
    B, L = ids.shape
    columns = torch.arange(L, device=ids.device)
    computed = columns if window is None else columns[window]
    keys = L if window is None else window.stop
    before = (columns[None, :keys] // block_length) <= (computed[:, None] // block_length)  # [W, K]: its block or earlier
    itself = columns[None, :keys] == computed[:, None]  # a padding query sees itself: no row of the mask is empty
    real = None if attention_mask is None else attention_mask[:, :keys].bool()
    mask = before[None, None] if real is None else (before[None, None] & real[:, None, None, :]) | itself[None, None]
    if cache is None:
        if window is not None:
            raise ValueError("a window forward needs a KVCache")
        return ForwardContext(batch, cos, sin, mask)
    if cache.k is None:
        cache.allocate(cfg, B, L, dtype, ids.device, block_devices)
    if window is None:
        window = slice(0, L)
    keys_seen = torch.full((B,), keys, device=ids.device) if real is None else real.sum(1)
    return ForwardContext(batch.window(window), cos[..., window, :], sin[..., window, :], mask, cache, computed,
                          key_limit=keys, keys=keys_seen, exact=True)


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
