"""CUDA-graph replay of forward passes: each block, and each routing decision, is captured once per
input shape and replayed as one launch.

At batch 1 a LLaDA-8B block is about a millisecond of GPU work made of dozens of kernels; launched
one by one from Python the GPU waits between them, and after every host read of a routing decision
the launch pipeline restarts empty. Replayed from graphs, a block is one launch that updates the
hidden states in place, and a router is one launch that also copies its decisions to pinned host
memory, so the one host read per block costs a round trip instead of a pipeline of launches.

``GraphRunner`` is an ``Executor`` of the model's own block loop (``models/execution.run_blocks``): the loop, the
policy questions and the cache rules stay the model's. What the runner adds is static memory per
shape: every forward copies its inputs (hidden states, rotary tables, key mask, the policy's view,
cache slots) into the buffers the graphs read, so a replay always sees the current batch, padding
included. Rows that disagree about a block run it through the eager subset path. Off the GPU a
"graph" is its function called directly, so the tests check this control flow on the CPU. The
graphs hold the weights' addresses: build the runner after the model is final (LoRA merged,
blocks compiled).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import replace
from typing import Callable

import torch
from torch import Tensor

from ..models.execution import Executor, ForwardContext, KVCache, LogitPositions, run_block
from ..models.llada import Block, LLaDA
from ..skipping.policies import NO_SKIP, Decision, ForwardBatch, SkipPolicy, SkipTrace

log = logging.getLogger(__name__)


class _Capture:
    """Captures functions into CUDA graphs sharing one memory pool, until a capture fails: a failed
    capture leaves PyTorch's allocator unable to start another, so from then on work runs eagerly."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.enabled = device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.enabled else None

    def __call__(self, fn: Callable[[], None], warm: Callable[[], object]) -> Callable[[], None]:
        """A replay of ``fn`` (warmed up first with ``warm``), or ``fn`` itself."""
        if not self.enabled:
            return fn
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            warm()  # compiles kernels and creates library workspaces outside the capture
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                fn()
        except RuntimeError as err:  # torch.AcceleratorError is a RuntimeError
            log.warning("CUDA graph capture failed (%s); running eagerly from now on", str(err).splitlines()[0])
            torch.cuda.synchronize(self.device)
            self.enabled = False
            return fn
        return graph.replay


def _static(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clone()


class _ShapeGraphs:
    """Static buffers and graphs for one forward shape: (batch, computed, canvas, padded, cache role)."""

    def __init__(self, n_layers: int, x: Tensor, ctx: ForwardContext, capture: _Capture, kv: tuple[Tensor, Tensor] | None) -> None:
        self.capture, self.device = capture, x.device
        self.h = torch.empty_like(x)
        b = ctx.batch
        self.ctx = ForwardContext(
            ForwardBatch(b.ids.clone(), _static(b.attention_mask), b.masked.clone(), b.row_keys.clone(), b.mask_ratio.clone()),
            ctx.cos.clone(), ctx.sin.clone(), _static(ctx.key_mask),
            None if kv is None else KVCache(*kv),
            _static(ctx.positions), ctx.filling,
        )
        B = x.shape[0]
        self.decision = torch.empty(B, dtype=torch.bool, device=self.device)
        self.host = torch.empty(B, dtype=torch.bool, pin_memory=self.device.type == "cuda")
        self.blocks: list[Callable[[], None] | None] = [None] * n_layers
        self.routers: dict[tuple[int, int], Callable[[], None] | None] = {}  # (id(policy), block) -> replay; None: host-known

    def load(self, x: Tensor, ctx: ForwardContext) -> ForwardContext:
        """Copy this forward's inputs into the static buffers; the context the graphs read."""
        self.h.copy_(x)
        s, b = self.ctx, ctx.batch
        for mine, theirs in ((s.batch.ids, b.ids), (s.batch.attention_mask, b.attention_mask), (s.batch.masked, b.masked),
                             (s.batch.row_keys, b.row_keys), (s.batch.mask_ratio, b.mask_ratio), (s.cos, ctx.cos),
                             (s.sin, ctx.sin), (s.key_mask, ctx.key_mask),
                             (s.positions, ctx.positions)):
            if mine is not None:
                mine.copy_(theirs)
        return replace(s, cache=ctx.cache)

    def block(self, layer: int, block: Block) -> Callable[[], None]:
        if self.blocks[layer] is None:
            ctx = self.ctx
            kv = None if ctx.cache is None else (ctx.cache.k[layer], ctx.cache.v[layer])
            args = (ctx.cos, ctx.sin, ctx.key_mask, kv, ctx.positions)
            self.blocks[layer] = self.capture(lambda: self.h.copy_(block(self.h, *args)), lambda: block(self.h, *args))
        return self.blocks[layer]

    def decide(self, layer: int, policy: SkipPolicy) -> Decision | list[bool]:
        """The policy's decision for a block: a host-known bool, or per-row bools read back once."""
        key = (id(policy), layer)
        batch = self.ctx.batch
        if key not in self.routers:
            if isinstance(policy.rows_to_run(layer, self.h, batch), bool):
                self.routers[key] = None
            else:
                def decide() -> None:
                    self.decision.copy_(policy.rows_to_run(layer, self.h, batch))
                    self.host.copy_(self.decision, non_blocking=True)

                self.routers[key] = self.capture(decide, lambda: policy.rows_to_run(layer, self.h, batch))
        graph = self.routers[key]
        if graph is None:
            return policy.rows_to_run(layer, self.h, batch)
        graph()
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # sync: the one host read of this block
        return self.host.tolist()


class GraphRunner(Executor):
    """``model.forward`` with blocks and routers replayed from CUDA graphs kept per input shape."""

    def __init__(self, model: LLaDA, shapes: int = 4) -> None:
        self.model, self.shapes = model, shapes
        self.capture = _Capture(model.device)
        self.cache: OrderedDict[tuple, _ShapeGraphs] = OrderedDict()
        self.kv: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()  # cache storage, shared by fill and window graphs
        self.current: _ShapeGraphs | None = None

    @torch.no_grad()
    def __call__(
        self, ids: Tensor, attention_mask: Tensor | None = None, policy: SkipPolicy = NO_SKIP,
        logits_at: LogitPositions = None, cache: KVCache | None = None, window: slice | None = None,
    ) -> tuple[Tensor, SkipTrace]:
        if cache is not None and window is None:  # a fill: lend the storage our graphs read and write
            cfg = self.model.cfg
            cache.k, cache.v = self._storage((cfg.n_layers, ids.shape[0], cfg.n_kv_heads, ids.shape[1], cfg.head_dim))
        return self.model(ids, attention_mask, policy, logits_at, cache=cache, window=window, executor=self)

    def begin(self, model: LLaDA, x: Tensor, ctx: ForwardContext) -> tuple[Tensor, ForwardContext]:
        role = "plain" if ctx.cache is None else "fill" if ctx.filling else "window"
        key = (*x.shape[:2], ctx.key_mask is not None, None if ctx.cache is None else ctx.cache.k.shape[3], role)
        graphs = self.cache.pop(key, None)
        if graphs is None or (ctx.cache is not None and graphs.ctx.cache.k is not ctx.cache.k):
            kv = None if ctx.cache is None else (ctx.cache.k, ctx.cache.v)  # graphs hold the cache's storage
            graphs = _ShapeGraphs(model.cfg.n_layers, x, ctx, self.capture, kv)
        self.cache[key] = graphs
        while len(self.cache) > self.shapes:
            self.cache.popitem(last=False)
        self.current = graphs
        return graphs.h, graphs.load(x, ctx)

    def _storage(self, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """Cache storage for one shape, shared by the fill and window graphs of that shape."""
        dtype, device = self.model.dtype, self.model.device
        kv = self.kv.pop(shape, None) or (torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
        self.kv[shape] = kv
        while len(self.kv) > self.shapes:
            self.kv.popitem(last=False)
        return kv

    def decide(self, layer: int, policy: SkipPolicy, x: Tensor, ctx: ForwardContext) -> Decision | list[bool]:
        return self.current.decide(layer, policy)

    def run(self, layer: int, block: Block, x: Tensor, run: Decision | list[bool], ctx: ForwardContext) -> Tensor:
        graphs = self.current
        if run is False:
            return x
        if run is True:
            graphs.block(layer, block)()
        else:  # rows disagree: the eager subset path, into the static hidden states
            graphs.h.copy_(run_block(block, layer, graphs.h, run, ctx))
        return graphs.h
