"""How a forward runs its blocks: the skip policy asked per block, the KV cache of cached decoding,
and the executor that runs each block (eagerly here, replayed from CUDA graphs in
decoding/graphs.py). Family-agnostic: a model builds a ``ForwardContext`` and hands its blocks to
``run_blocks``, the one block loop of the package.

A skipped row keeps its hidden states (h_{l+1} = h_l). Decisions the host can branch on stay
Python bools; per-row decisions are read back once per block (the one sync of a routed block),
or, in the window forwards of cached decoding with ``reuse_decisions``, taken from the cache fill.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..skipping.policies import Decision, ForwardBatch, SkipPolicy, SkipTrace

KV = tuple[Tensor, Tensor] | None  # one block's cached keys and values [B, H_kv, L, hd], or None
LogitPositions = slice | Tensor | None  # None: all; slice: columns; Tensor: flat indices into B*W


@dataclass
class KVCache:
    """Keys and values of every block over the whole canvas, kept between the forwards of one
    semi-autoregressive block of cached decoding (Fast-dLLM's prefix and dual caches).

    A full forward fills it and records, per block, which rows ran it (``ran``): a row that
    skipped a block there has no keys and values for it, so it skips that block in every window
    forward until the next fill. With ``reuse_decisions`` the window forwards do not ask the skip
    policy at all and run exactly what the fill ran: no router cost and no host read per block
    there. With ``write_skipped`` (decisions asked at every step) the fill also writes the keys and
    values of the blocks a row skips, from the block's input (their K/V projections only, exactly
    what running the block would write), so a window forward may run any block the policy asks for:
    a fill that skipped a block no longer forbids it for the whole semi-autoregressive block.
    Storage is allocated by the first fill (or lent by an executor).

    Under block-causal attention (LLaDA2) the cache is exact instead: every forward is a window
    that writes its own keys and values, and finished blocks never change. The policy is asked at
    every forward; ``written`` [n_layers, B, L] records which slots each row wrote at each block,
    so that a row never reads the keys of a block it skipped when they were computed (the blocks
    in ``partial`` are those some forward skipped for some row: only they need the check).
    """

    k: Tensor | list[Tensor] | None = None  # [n_layers, B, H_kv, L, hd], rotated (per block when split over devices)
    v: Tensor | list[Tensor] | None = None
    ran: list[bool | list[bool]] = field(default_factory=list)  # per block, host-known
    reuse_decisions: bool = False
    write_skipped: bool = False
    written: Tensor | None = None  # [n_layers, B, L] bool, block-causal (exact) caches only
    partial: set[int] = field(default_factory=set)

    def allocate(
        self, cfg: Any, B: int, L: int, dtype: torch.dtype, device: torch.device,
        block_devices: tuple[torch.device, ...] | None = None,
    ) -> None:
        """Storage for every block over the canvas; with ``block_devices`` (a model split over
        devices) each block's keys and values on the block's device."""
        shape = (cfg.n_layers, B, cfg.n_kv_heads, L, cfg.head_dim)
        if block_devices is not None:
            self.k = [torch.empty(shape[1:], dtype=dtype, device=d) for d in block_devices]
            self.v = [torch.empty(shape[1:], dtype=dtype, device=d) for d in block_devices]
        elif not isinstance(self.k, Tensor) or self.k.shape != shape or self.k.dtype != dtype or self.k.device != device:
            self.k = torch.empty(shape, dtype=dtype, device=device)
            self.v = torch.empty(shape, dtype=dtype, device=device)
        self.ran = []
        self.written = torch.zeros(shape[:2] + (L,), dtype=torch.bool, device=device)
        self.partial = set()

    @property
    def length(self) -> int:
        """The canvas length L the storage covers."""
        return self.k[0].shape[-2]


@dataclass
class ForwardContext:
    """What every block of one forward reads besides its input, built once per forward."""

    batch: ForwardBatch  # the computed positions, as the skip policy sees them
    cos: Tensor  # [W, hd] rotary tables at the computed positions ([B, 1, W, hd] with per-row positions)
    sin: Tensor
    key_mask: Tensor | None  # [B, 1, 1, L] bool: real (non-padding) keys, [B|1, 1, W, K] block-causal; None: all
    cache: KVCache | None = None
    positions: Tensor | None = None  # [W] canvas slots the computed positions write in the cache
    filling: bool = False  # a full forward that (re)fills the cache
    key_limit: int | None = None  # block-causal window: the keys read are the cache's first key_limit slots
    keys: Tensor | None = None  # [B] real keys a row's queries attend over (cached forwards), for FLOPs
    exact: bool = False  # block-causal cache: policy asked every forward, unwritten keys hidden

    def to(self, device: torch.device) -> "ForwardContext":
        """The same context with its tensors on ``device``: what a block on another device reads
        (the cache is shared: each block's storage already lives with the block)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, batch=self.batch.to(device), cos=move(self.cos), sin=move(self.sin),
                       key_mask=move(self.key_mask), positions=move(self.positions), keys=move(self.keys))

    def kv(self, layer: int) -> KV:
        """Block ``layer``'s cache storage this forward reads and writes (None without a cache)."""
        if self.cache is None:
            return None
        limit = slice(None, self.key_limit)
        return self.cache.k[layer][:, :, limit], self.cache.v[layer][:, :, limit]

    def mask_for(self, layer: int) -> Tensor | None:
        """The key mask of block ``layer``: with an exact cache, slots a row never wrote at this
        block (it skipped the block when they were computed) are hidden as well."""
        if not self.exact or layer not in self.cache.partial:
            return self.key_mask
        written = self.cache.written[layer][:, : self.key_limit].to(self.key_mask.device, copy=True)
        written[:, self.positions] = True  # this forward writes its own columns before attending
        return self.key_mask & written[:, None, None, :]


class Executor:
    """How the block loop runs each step: eagerly, as here, or replayed from CUDA graphs (decoding/graphs.py).
    The loop itself is ``run_blocks``', whichever executor runs it."""

    def begin(self, model: nn.Module, x: Tensor, ctx: ForwardContext) -> tuple[Tensor, ForwardContext]:
        return x, ctx

    def decide(self, layer: int, policy: SkipPolicy, x: Tensor, ctx: ForwardContext) -> Decision:
        return policy.rows_to_run(layer, x, ctx.batch)

    def run(self, layer: int, block: nn.Module, x: Tensor, run: Decision, ctx: ForwardContext) -> Tensor:
        return run_block(block, layer, x, run, ctx)


EAGER_EXECUTOR = Executor()


def run_blocks(
    blocks: nn.ModuleList, x: Tensor, policy: SkipPolicy, ctx: "ForwardContext", executor: "Executor",
    hidden_states: list[Tensor] | None = None, block_devices: tuple[torch.device, ...] | None = None,
) -> tuple[Tensor, SkipTrace]:
    """The block loop: ask the policy (or the cache fill) which rows run each block, run them; the
    hidden states after the last block and the forward's trace. Appends each block's input to
    ``hidden_states`` when given. With ``block_devices`` (a model split over devices) the hidden
    states and the context move to each block's device when it differs from the previous one's."""
    reuse = ctx.cache is not None and not ctx.filling and not ctx.exact and ctx.cache.reuse_decisions
    decisions: list[Decision] = []
    kv_only: list[bool | list[bool]] = []  # per block of a fill with ``write_skipped``: rows that only wrote K/V
    here = ctx  # the context on the device of the block that runs
    for i, block in enumerate(blocks):
        if block_devices is not None and block_devices[i] != x.device:
            x, here = x.to(block_devices[i]), ctx.to(block_devices[i])
        if hidden_states is not None:
            hidden_states.append(x)
        if reuse:
            run = ctx.cache.ran[i]
        else:
            run = resolve(executor.decide(i, policy, x, here))
            if ctx.filling:
                if ctx.cache.write_skipped and run is not True:
                    write_skipped_kv(block, i, x, run, here)
                    kv_only.append(True if run is False else [not r for r in run])
                else:
                    kv_only.append(False)
                ctx.cache.ran.append(True if ctx.cache.write_skipped else run)
            elif ctx.cache is not None and not ctx.exact:
                run = both(run, ctx.cache.ran[i])
        x = executor.run(i, block, x, run, here)
        decisions.append(run)
    trace = make_trace(decisions, ctx, 0 if reuse else getattr(policy, "routed_layers", 0), kv_only)
    if ctx.exact:
        ctx.cache.partial.update(i for i, run in enumerate(decisions) if run is not True)
        ctx.cache.written[:, :, ctx.positions] |= trace.executed.T[:, :, None]
    return x, trace


def make_trace(decisions: list, ctx: ForwardContext, routed_layers: int, kv_only: list | None = None) -> SkipTrace:
    """The trace of one forward (its head positions are filled in once the head has run): the
    tokens computed per row, the keys each attended to (the whole canvas in a window forward) and
    the skipped blocks whose keys and values a fill wrote all the same."""
    batch = ctx.batch
    B, W = batch.ids.shape
    device = batch.ids.device
    computed = torch.full((B,), W, device=device) if batch.attention_mask is None else batch.attention_mask.sum(1)
    keys = ctx.keys
    if ctx.cache is not None and keys is None:
        L = ctx.cache.length
        keys = torch.full((B,), L, device=device) if ctx.key_mask is None else ctx.key_mask.flatten(1).sum(1)
    executed = SkipTrace.from_decisions(decisions, B, device)
    wrote = SkipTrace.from_decisions(kv_only, B, device) if kv_only and any(k is not False for k in kv_only) else None
    return SkipTrace(executed, computed, computed, batch.masked.sum(1), routed_layers, keys, kv_only=wrote)


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


def write_skipped_kv(block: nn.Module, layer: int, x: Tensor, run: bool | list[bool], ctx: ForwardContext) -> None:
    """In a fill with ``write_skipped``: the keys and values of block ``layer`` for the rows that
    skip it (all when ``run`` is False), from its input ``x``, written into their cache rows."""
    kv = ctx.kv(layer)
    if run is False:
        block.write_kv(x, ctx.cos, ctx.sin, kv, ctx.positions)
        return
    rows = torch.tensor([i for i, r in enumerate(run) if not r], device=x.device)
    sub_kv = (kv[0].index_select(0, rows), kv[1].index_select(0, rows))
    cos, sin = (ctx.cos, ctx.sin) if ctx.cos.dim() == 2 else (ctx.cos.index_select(0, rows), ctx.sin.index_select(0, rows))
    block.write_kv(x.index_select(0, rows), cos, sin, sub_kv, ctx.positions)
    kv[0].index_copy_(0, rows, sub_kv[0])
    kv[1].index_copy_(0, rows, sub_kv[1])


def run_block(block: Callable[..., Tensor], layer: int, x: Tensor, run: Decision | list[bool], ctx: ForwardContext) -> Tensor:
    """Run ``block`` for the rows the policy chose; a skipped row keeps its input unchanged."""
    kv, key_mask = ctx.kv(layer), ctx.mask_for(layer)
    args = (ctx.cos, ctx.sin, key_mask, kv, ctx.positions)
    if run is True:
        return block(x, *args)
    if run is False:
        return x
    if isinstance(run, Tensor):  # a differentiable gate in [0, 1] (router training)
        return x + run.to(x.dtype)[:, None, None] * (block(x, *args) - x)
    rows = torch.tensor([i for i, c in enumerate(run) if c], device=x.device)
    sub_mask = None if key_mask is None else key_mask if len(key_mask) == 1 else key_mask.index_select(0, rows)
    sub_kv = None if kv is None else (kv[0].index_select(0, rows), kv[1].index_select(0, rows))
    cos, sin = (ctx.cos, ctx.sin) if ctx.cos.dim() == 2 else (ctx.cos.index_select(0, rows), ctx.sin.index_select(0, rows))
    out = block(x.index_select(0, rows), cos, sin, sub_mask, sub_kv, ctx.positions)
    if kv is not None:  # the subset's refreshed keys and values go back into the cache
        kv[0].index_copy_(0, rows, sub_kv[0])
        kv[1].index_copy_(0, rows, sub_kv[1])
    return x.index_copy(0, rows, out)
