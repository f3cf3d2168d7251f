"""FLOPs of forward passes from their SkipTraces, and per-task totals.

Two normalised figures, both 1.0 with nothing skipped:

* papers': executed blocks / all blocks, averaged over forwards (one skipped block of 32 is
  31/32 = 0.96875), as in both skipping papers;
* whole-model: FLOPs actually spent / FLOPs of the same forwards with no skipping, counting the
  embedding, every block (projections, attention's sequence-length term, SwiGLU MLP), the LM
  head at the positions whose logits were computed, and the routers' own cost.

Per token, following Kaplan et al. 2020 (Table 1) and PaLM (Chowdhery et al. 2022, App. B),
with no causal halving since LLaDA attends in both directions:
embedding 4d; per block 2d(2d + 2 d_kv) for q,k,v,o, 4 n d for scores and values, 6 d d_ff for
the MLP; LM head 2 d V per computed position; router 2(d h + 2 h) per evaluated block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .model import LLaDAConfig
from .policies import SkipTrace


@dataclass(frozen=True)
class FlopsModel:
    d_model: int
    n_layers: int
    kv_dim: int
    mlp_hidden: int
    vocab: int
    router_hidden: int = 0  # 0: no router

    @classmethod
    def of(cls, cfg: LLaDAConfig, router_hidden: int = 0) -> "FlopsModel":
        return cls(cfg.d_model, cfg.n_layers, cfg.n_kv_heads * cfg.head_dim, cfg.mlp_hidden_size, cfg.vocab_size, router_hidden)

    def block(self, n: Tensor) -> Tensor:
        """One block over a sequence of n tokens."""
        d = self.d_model
        return n * (2 * d * (2 * d + 2 * self.kv_dim) + 6 * d * self.mlp_hidden) + 4 * n * n * d

    def router(self, n: Tensor) -> Tensor:
        h = self.router_hidden
        return n * 2 * (self.d_model * h + 2 * h)

    def forward(self, trace: SkipTrace) -> tuple[Tensor, Tensor]:
        """Per-row FLOPs [B] spent, and [B] for the same rows with no skipping (float64)."""
        n = trace.seq_lens.double()
        fixed = 4 * self.d_model * n + 2 * self.d_model * self.vocab * trace.head_positions.double()
        block = self.block(n)
        spent = fixed + trace.executed.sum(1).double() * block + trace.routed_layers * self.router(n)
        return spent, fixed + self.n_layers * block


@dataclass
class TaskTotals:
    """Running sums for one task (host side, after the device accumulators are read)."""

    forwards: int = 0
    executed_blocks: float = 0.0
    per_block: list[float] = field(default_factory=list)
    flops: float = 0.0
    flops_no_skip: float = 0.0

    def add(self, other: "TaskTotals") -> None:
        self.forwards += other.forwards
        self.executed_blocks += other.executed_blocks
        self.per_block = [a + b for a, b in zip(self.per_block, other.per_block)] if self.per_block else list(other.per_block)
        self.flops += other.flops
        self.flops_no_skip += other.flops_no_skip

    def summary(self, n_layers: int) -> dict:
        rows = max(self.forwards, 1)
        return {
            "forwards": self.forwards,
            "normalized_flops_papers": self.executed_blocks / (rows * n_layers),
            "normalized_flops_whole_model": self.flops / self.flops_no_skip if self.flops_no_skip else 1.0,
            "mean_executed_blocks": self.executed_blocks / rows,
            "block_execution_ratio": [c / rows for c in self.per_block],
            "tflops": self.flops / 1e12,
            "tflops_no_skip": self.flops_no_skip / 1e12,
        }


class FlopsMeter:
    """Accumulates traces per task on the device; read back once per harness call.

    A "forward" is one row of one forward pass (a Monte-Carlo sample, or a sequence at one
    denoising step): the unit the papers average over.
    """

    def __init__(self, flops: FlopsModel, device: torch.device) -> None:
        self.flops = flops
        self.device = device
        self.totals: dict[str, TaskTotals] = {}
        self._open(())

    def _open(self, tasks: tuple[str, ...]) -> None:
        n, L = len(tasks), self.flops.n_layers
        self.tasks = tasks
        self._rows = torch.zeros(n, dtype=torch.float64, device=self.device)
        self._blocks = torch.zeros(n, L, dtype=torch.float64, device=self.device)
        self._spent = torch.zeros(n, dtype=torch.float64, device=self.device)
        self._full = torch.zeros(n, dtype=torch.float64, device=self.device)

    def start(self, tasks: list[str]) -> dict[str, int]:
        """Begin a harness call over ``tasks``; returns each task's index for ``record``."""
        self.flush()
        self._open(tuple(dict.fromkeys(tasks)))
        return {t: i for i, t in enumerate(self.tasks)}

    def record(self, trace: SkipTrace, row_task: Tensor) -> None:
        """Add one forward pass; ``row_task`` [B] gives each row's task index."""
        spent, full = self.flops.forward(trace)
        self._rows.index_add_(0, row_task, torch.ones_like(spent))
        self._blocks.index_add_(0, row_task, trace.executed.double())
        self._spent.index_add_(0, row_task, spent)
        self._full.index_add_(0, row_task, full)

    def flush(self) -> dict[str, TaskTotals]:
        """Move the device sums into ``totals`` (one sync); returns this call's totals."""
        if not self.tasks:
            return {}
        rows, blocks = self._rows.tolist(), self._blocks.tolist()
        spent, full = self._spent.tolist(), self._full.tolist()
        added = {}
        for i, task in enumerate(self.tasks):
            if rows[i]:
                part = TaskTotals(int(rows[i]), sum(blocks[i]), blocks[i], spent[i], full[i])
                self.totals.setdefault(task, TaskTotals()).add(part)
                added[task] = part
        self._open(())
        return added

    def merge(self, others: list[dict[str, TaskTotals]]) -> None:
        """Add totals gathered from other ranks."""
        for totals in others:
            for task, part in totals.items():
                self.totals.setdefault(task, TaskTotals()).add(part)

    def summary(self) -> dict[str, dict]:
        return {task: t.summary(self.flops.n_layers) for task, t in sorted(self.totals.items())}
