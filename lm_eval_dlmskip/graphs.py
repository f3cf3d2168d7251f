"""CUDA-graph replay of forward passes: each block, and each routing decision, is captured once per
input shape and replayed as one launch.

At batch 1 a LLaDA-8B block is about a millisecond of GPU work made of dozens of kernels; launched
one by one from Python the GPU waits between them, and after every host read of a routing decision
the launch pipeline restarts empty. Replayed from graphs, a block is one launch that updates the
hidden states in place, and a router is one launch that also copies its decisions to pinned host
memory, so the one host read per block costs a round trip instead of a pipeline of launches.

``GraphRunner`` has ``LLaDA.forward``'s contract, so the diffusion algorithms never know about it.
Graphs are kept for a few recent shapes (generation reuses one shape for every denoising step).
Rows that disagree about a block run it through the eager subset path. Off the GPU a "graph" is
its function called directly, so the tests check this control flow on the CPU. The graphs hold
the weights' addresses: build the runner after the model is final (LoRA merged, blocks compiled).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor

from .model import LLaDA, LogitPositions, _run_block, head_positions, make_trace, rotary_tables
from .policies import NO_SKIP, ForwardBatch, SkipPolicy, SkipTrace

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


class _ShapeGraphs:
    """Static buffers and graphs for one (batch, length, padded) shape."""

    def __init__(self, model: LLaDA, ids: Tensor, attention_mask: Tensor | None, capture: _Capture) -> None:
        cfg, device = model.cfg, ids.device
        B, L = ids.shape
        self.model, self.capture, self.device = model, capture, device
        self.ids = ids.clone()
        self.mask = None if attention_mask is None else attention_mask.clone()
        self.h = torch.empty(B, L, cfg.d_model, dtype=model.dtype, device=device)
        self.cos, self.sin = rotary_tables(L, cfg.head_dim, cfg.rope_theta, device)
        self.key_mask = None if self.mask is None else self.mask.bool()[:, None, None, :]
        probe = ForwardBatch.of(self.ids, self.mask, cfg.mask_token_id)
        self.batch = ForwardBatch(self.ids, self.mask, probe.masked.clone(), probe.row_keys.clone())
        self.decision = torch.empty(B, dtype=torch.bool, device=device)
        self.host = torch.empty(B, dtype=torch.bool, pin_memory=device.type == "cuda")
        self.embed = capture(self._embed, lambda: model.embed(self.ids))
        self.blocks: list[Callable[[], None] | None] = [None] * cfg.n_layers
        self.routers: dict[tuple[int, int], Callable[[], None] | None] = {}  # (id(policy), block) -> replay; None: host-known

    def _embed(self) -> None:
        self.h.copy_(self.model.embed(self.ids))
        fresh = ForwardBatch.of(self.ids, self.mask, self.model.cfg.mask_token_id)
        self.batch.masked.copy_(fresh.masked)
        self.batch.row_keys.copy_(fresh.row_keys)

    def _block(self, i: int) -> Callable[[], None]:
        if self.blocks[i] is None:
            block = self.model.blocks[i]
            args = (self.cos, self.sin, self.key_mask)
            self.blocks[i] = self.capture(lambda: self.h.copy_(block(self.h, *args)), lambda: block(self.h, *args))
        return self.blocks[i]

    def _decide(self, i: int, policy: SkipPolicy) -> bool | list[bool]:
        """The policy's decision for block i: a host-known bool, or per-row bools read back once."""
        key = (id(policy), i)
        if key not in self.routers:
            first = policy.rows_to_run(i, self.h, self.batch)
            if isinstance(first, bool):
                self.routers[key] = None
            else:
                def decide() -> None:
                    self.decision.copy_(policy.rows_to_run(i, self.h, self.batch))
                    self.host.copy_(self.decision, non_blocking=True)

                self.routers[key] = self.capture(decide, lambda: policy.rows_to_run(i, self.h, self.batch))
        graph = self.routers[key]
        if graph is None:
            return policy.rows_to_run(i, self.h, self.batch)
        graph()
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # sync: the one host read of this block
        return self.host.tolist()

    def run(self, ids: Tensor, attention_mask: Tensor | None, policy: SkipPolicy) -> tuple[Tensor, list]:
        self.ids.copy_(ids)
        if self.mask is not None:
            self.mask.copy_(attention_mask)
        self.embed()
        decisions: list = []
        for i, block in enumerate(self.model.blocks):
            run = self._decide(i, policy)
            if run is True or (isinstance(run, list) and all(run)):
                self._block(i)()
            elif run is not False and any(run):  # rows disagree: the eager subset path
                self.h.copy_(_run_block(block, self.h, torch.tensor(run, device=self.device), self.cos, self.sin, self.key_mask))
            decisions.append(run)
        return self.h, decisions


class GraphRunner:
    """``model.forward`` with blocks and routers replayed from CUDA graphs kept per input shape."""

    def __init__(self, model: LLaDA, shapes: int = 4) -> None:
        self.model, self.shapes = model, shapes
        self.capture = _Capture(model.device)
        self.cache: OrderedDict[tuple, _ShapeGraphs] = OrderedDict()

    @torch.no_grad()
    def __call__(
        self, ids: Tensor, attention_mask: Tensor | None = None, policy: SkipPolicy = NO_SKIP, logits_at: LogitPositions = None
    ) -> tuple[Tensor, SkipTrace]:
        key = (*ids.shape, attention_mask is not None)
        graphs = self.cache.pop(key, None) or _ShapeGraphs(self.model, ids, attention_mask, self.capture)
        self.cache[key] = graphs
        while len(self.cache) > self.shapes:
            self.cache.popitem(last=False)
        h, decisions = graphs.run(ids, attention_mask, policy)
        trace = make_trace(decisions, graphs.batch, policy)
        trace.head_positions = head_positions(logits_at, *ids.shape, ids.device)
        return self.model.head(h, logits_at), trace
