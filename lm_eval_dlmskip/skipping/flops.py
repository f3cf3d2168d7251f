"""FLOPs of forward passes from their SkipTraces, and per-task totals.

Two normalised figures, both 1.0 with nothing skipped:

* papers': executed blocks / all blocks, averaged over forwards (one skipped block of 32 is
  31/32 = 0.96875), as in both skipping papers;
* whole-model: FLOPs actually spent (a block computed for a row and its output discarded
  counts) / FLOPs of the same forwards with no skipping, counting the
  embedding, every block (projections, attention's sequence-length term, SwiGLU MLP), the LM
  head at the positions whose logits were computed, and the routers' own cost.

Per token, following Kaplan et al. 2020 (Table 1) and PaLM (Chowdhery et al. 2022, App. B),
with no causal halving since LLaDA attends in both directions:
embedding 4d; per block 2d(2d + 2 d_kv) for q,k,v,o, 4 n d for scores and values (4 K d over K
cached keys in a window forward of cached decoding), 6 d d_ff for the MLP; LM head 2 d V per computed position; router 2(d h + (depth-2) h^2 + 2 h) per evaluated
block (routers read every position; like biases and norms, a mask-ratio-aware router's r * w_r,
one add per hidden unit and position, 1 / (2d) of its first layer, is not counted); a skipped block
whose keys and values a cache fill still writes (decisions per step) 2 d (2 d_kv) per token. An MoE block (LLaDA2, LLaDA-MoE) counts the parameters a
token actually uses: 2 d E for the expert router, 6 d h for each of its top_k experts and the
shared expert; the dense first layers count their SwiGLU.

Forwards are also binned by how much of the answer is still masked (10 buckets of the masked
fraction), so one can see that later denoising steps (little left masked) run fewer blocks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from .policies import SkipTrace


@dataclass(frozen=True)
class FlopsModel:
    d_model: int
    n_layers: int
    kv_dim: int
    mlp_hidden: int
    vocab: int
    router_hidden: int = 0  # 0: no router
    router_depth: int = 2
    q_dim: int | None = None  # query heads x head_dim when it is not d_model (LLaDA2's explicit head_dim)
    mlp_per_layer: tuple[int, ...] | None = None  # each block's MLP FLOPs per token (MoE families); None: SwiGLU of mlp_hidden

    @classmethod
    def of(cls, cfg: Any, router_hidden: int = 0, router_depth: int = 2) -> "FlopsModel":
        """From a model config (d_model, n_layers, heads and head_dim, mlp_hidden_size, vocab_size,
        moe). A MoE block counts the parameters a token actually uses: its router (2 d E), the
        top_k routed experts it is sent to and the shared expert (6 d h each), as PaLM counts a
        SwiGLU; a dense block its SwiGLU."""
        kv = cfg.n_kv_heads * cfg.head_dim
        mlp = None
        if getattr(cfg, "moe", None) is not None:
            moe, d = cfg.moe, cfg.d_model
            routed = 2 * d * moe.n_experts + 6 * d * (moe.top_k * moe.expert_hidden + moe.shared_hidden)
            mlp = tuple(routed if is_moe else 6 * d * cfg.mlp_hidden_size for is_moe in moe.moe_layers)
        return cls(cfg.d_model, cfg.n_layers, kv, cfg.mlp_hidden_size, cfg.vocab_size, router_hidden, router_depth,
                   cfg.n_heads * cfg.head_dim, mlp)

    def layers(self, n: Tensor, keys: Tensor | None = None) -> Tensor:
        """[B, n_layers]: each block computing n tokens that attend to ``keys`` keys (n, without a cache)."""
        d, q = self.d_model, self.q_dim or self.d_model
        keys = n if keys is None else keys
        attention = n * 2 * d * (2 * q + 2 * self.kv_dim) + 4 * n * keys * q
        mlp = _per_layer(self.mlp_per_layer or (6 * d * self.mlp_hidden,) * self.n_layers, n.device)
        return attention[:, None] + n[:, None] * mlp

    def router(self, n: Tensor) -> Tensor:
        h = self.router_hidden
        return n * 2 * (self.d_model * h + (self.router_depth - 2) * h * h + 2 * h)

    def plain_decoding(self, seq_lens: Tensor, steps: int, head_positions: int) -> Tensor:
        """[B] FLOPs of upstream's uncached decoding without skipping: ``steps`` full forwards over
        each row's real tokens, the LM head over ``head_positions`` (the current block)."""
        n = seq_lens.double()
        return steps * (4 * self.d_model * n + 2 * self.d_model * self.vocab * head_positions + self.layers(n).sum(1))

    def forward(self, trace: SkipTrace) -> tuple[Tensor, Tensor]:
        """Per-row FLOPs [B] spent, and [B] for the same rows with no skipping (float64)."""
        n = trace.seq_lens.double()
        fixed = 4 * self.d_model * n + 2 * self.d_model * self.vocab * trace.head_positions.double()
        layers = self.layers(n, None if trace.keys is None else trace.keys.double())
        ran = trace.executed if trace.computed is None else trace.computed
        spent = fixed + (ran.double() * layers).sum(1) + trace.routed_layers * self.router(n)
        if trace.kv_only is not None:  # skipped blocks whose keys and values a cache fill still wrote
            spent = spent + trace.kv_only.double().sum(1) * n * 2 * self.d_model * 2 * self.kv_dim
        return spent, fixed + layers.sum(1)


@lru_cache(maxsize=16)
def _per_layer(values: tuple[int, ...], device: torch.device) -> Tensor:
    """Per-layer constants on the device, copied there once."""
    return torch.tensor(values, dtype=torch.float64).to(device)


BUCKETS = 10  # masked-fraction bins: [0, 0.1), ..., [0.9, 1.0]


def _add(a: list, b: list) -> list:
    return [_add(x, y) if isinstance(x, list) else x + y for x, y in zip(a, b)] if a else b


@dataclass
class TaskTotals:
    """Running sums for one task (host side, after the device accumulators are read)."""

    forwards: int = 0
    executed_blocks: float = 0.0
    per_block: list[float] = field(default_factory=list)
    flops: float = 0.0
    flops_no_skip: float = 0.0
    bucket_forwards: list[float] = field(default_factory=list)  # [BUCKETS]
    bucket_blocks: list[list[float]] = field(default_factory=list)  # [BUCKETS][n_layers]
    tokens: float = 0.0  # tokens computed, summed over forwards
    decoded: int = 0  # generation rows (requests; twice with CFG) whose NFE is counted
    flops_plain: float = 0.0  # the same requests by uncached decoding without skipping
    seconds: float = 0.0  # wall time of the batches, shared out by rows (speed travels with the FLOPs)
    requests: int = 0  # requests answered (generation and likelihood)
    generated: int = 0  # answer tokens decoded (gen_length per generation request)

    def add(self, other: "TaskTotals") -> None:
        self.forwards += other.forwards
        self.executed_blocks += other.executed_blocks
        self.per_block = _add(self.per_block, other.per_block)
        self.flops += other.flops
        self.flops_no_skip += other.flops_no_skip
        self.bucket_forwards = _add(self.bucket_forwards, other.bucket_forwards)
        self.bucket_blocks = _add(self.bucket_blocks, other.bucket_blocks)
        self.tokens += other.tokens
        self.decoded += other.decoded
        self.flops_plain += other.flops_plain
        self.seconds += other.seconds
        self.requests += other.requests
        self.generated += other.generated

    def summary(self, n_layers: int) -> dict:
        rows = max(self.forwards, 1)
        buckets = [
            {
                "masked_fraction": [b / BUCKETS, (b + 1) / BUCKETS],
                "forwards": int(n),
                "mean_executed_blocks": sum(self.bucket_blocks[b]) / n,
                "block_execution_ratio": [c / n for c in self.bucket_blocks[b]],
            }
            for b, n in enumerate(self.bucket_forwards)
            if n
        ]
        return {
            "forwards": self.forwards,
            "normalized_flops_papers": self.executed_blocks / (rows * n_layers),
            "normalized_flops_whole_model": self.flops / self.flops_no_skip if self.flops_no_skip else 1.0,
            "mean_executed_blocks": self.executed_blocks / rows,
            "block_execution_ratio": [c / rows for c in self.per_block],
            "tflops": self.flops / 1e12,
            "tflops_no_skip": self.flops_no_skip / 1e12,
            "tokens_per_forward": self.tokens / rows,
            **({} if not self.decoded else {
                "nfe_per_request": self.forwards / self.decoded,
                "normalized_flops_vs_plain_decoding": self.flops / self.flops_plain,
            }),
            "by_masked_fraction": buckets,
        }

    def speed(self) -> dict:
        """Wall seconds of the task's batches and the rates they give (empty when nothing was timed,
        e.g. every answer came from --use_cache)."""
        if not self.seconds:
            return {}
        return {
            "wall_seconds": self.seconds,
            "requests_per_s": self.requests / self.seconds,
            "forwards_per_s": self.forwards / self.seconds,
            **({"generated_tokens": self.generated, "tokens_per_s": self.generated / self.seconds} if self.generated else {}),
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
        self._timed: dict[str, list[float]] = {}  # task -> [seconds, requests, generated], host side
        self._rows = torch.zeros(n, dtype=torch.float64, device=self.device)
        self._blocks = torch.zeros(n, L, dtype=torch.float64, device=self.device)
        self._spent = torch.zeros(n, dtype=torch.float64, device=self.device)
        self._full = torch.zeros(n, dtype=torch.float64, device=self.device)
        self._bucket_rows = torch.zeros(n * BUCKETS, dtype=torch.float64, device=self.device)
        self._bucket_blocks = torch.zeros(n * BUCKETS, L, dtype=torch.float64, device=self.device)
        self._tokens = torch.zeros(n, dtype=torch.float64, device=self.device)
        self._decoded = torch.zeros(n, dtype=torch.float64, device=self.device)
        self._plain = torch.zeros(n, dtype=torch.float64, device=self.device)

    def start(self, tasks: list[str]) -> dict[str, int]:
        """Begin a harness call over ``tasks``; returns each task's index for ``record``."""
        self.flush()
        self._open(tuple(dict.fromkeys(tasks)))
        return {t: i for i, t in enumerate(self.tasks)}

    def record(self, trace: SkipTrace, row_task: Tensor, answer_len: Tensor | None = None) -> None:
        """Add one forward pass; ``row_task`` [B] gives each row's task index and ``answer_len`` [B]
        the answer length its masked fraction is measured against."""
        spent, full = self.flops.forward(trace)
        executed = trace.executed.double()
        self._rows.index_add_(0, row_task, torch.ones_like(spent))
        self._tokens.index_add_(0, row_task, trace.seq_lens.double())
        self._blocks.index_add_(0, row_task, executed)
        self._spent.index_add_(0, row_task, spent)
        self._full.index_add_(0, row_task, full)
        if answer_len is not None:
            fraction = (trace.masked.double() / answer_len.clamp(min=1)).clamp(0, 1)
            bucket = row_task * BUCKETS + (fraction * BUCKETS).long().clamp(max=BUCKETS - 1)
            self._bucket_rows.index_add_(0, bucket, torch.ones_like(spent))
            self._bucket_blocks.index_add_(0, bucket, executed)

    def decoding(self, row_task: Tensor, plain_flops: Tensor) -> None:
        """Count generation rows (so NFE per request can be reported) and what uncached decoding
        without skipping would have spent on them."""
        self._decoded.index_add_(0, row_task, torch.ones_like(plain_flops))
        self._plain.index_add_(0, row_task, plain_flops)

    def timed(self, tasks: list[str], seconds: float, generated_per_request: int = 0) -> None:
        """Add a batch's wall time (measured after its results reached the host), shared out over
        its requests, one task name per request."""
        for task in tasks:
            totals = self._timed.setdefault(task, [0.0, 0, 0])
            totals[0] += seconds / len(tasks)
            totals[1] += 1
            totals[2] += generated_per_request

    def flush(self) -> dict[str, TaskTotals]:
        """Move the device sums into ``totals`` (one sync); returns this call's totals."""
        if not self.tasks:
            return {}
        rows, blocks = self._rows.tolist(), self._blocks.tolist()
        spent, full = self._spent.tolist(), self._full.tolist()
        bucket_rows = self._bucket_rows.view(len(self.tasks), BUCKETS).tolist()
        bucket_blocks = self._bucket_blocks.view(len(self.tasks), BUCKETS, -1).tolist()
        tokens, decoded, plain = self._tokens.tolist(), self._decoded.tolist(), self._plain.tolist()
        added = {}
        for i, task in enumerate(self.tasks):
            if rows[i]:
                seconds, requests, generated = self._timed.get(task, (0.0, 0, 0))
                part = TaskTotals(int(rows[i]), sum(blocks[i]), blocks[i], spent[i], full[i], bucket_rows[i],
                                  bucket_blocks[i], tokens[i], int(decoded[i]), plain[i], seconds, int(requests),
                                  int(generated))
                self.totals.setdefault(task, TaskTotals()).add(part)
                added[task] = part
        self._open(())
        return added

    def merge(self, others: list[dict[str, TaskTotals]]) -> None:
        """Add totals gathered from other ranks."""
        for totals in others:
            for task, part in totals.items():
                self.totals.setdefault(task, TaskTotals()).add(part)

    def merge_ranks(self, gathered: list[list[dict[str, TaskTotals]]]) -> set[str]:
        """On rank 0, after gathering every rank's unmerged figures (rank 0's own, ``gathered[0]``,
        are counted already): add the other ranks'; returns the tasks any rank touched."""
        self.merge([part for parts in gathered[1:] for part in parts])
        return {task for parts in gathered for part in parts for task in part}

    def summary(self) -> dict[str, dict]:
        return {task: t.summary(self.flops.n_layers) for task, t in sorted(self.totals.items())}

    def speed(self) -> dict[str, dict]:
        return {task: t.speed() for task, t in sorted(self.totals.items()) if t.seconds}

    def router_warnings(self, tasks: Iterable[str], model: str = "llada_skip") -> list[str]:
        """One line per task whose routers cost more than their skipping saved (whole-model
        normalized FLOPs >= 1.0): routing there only adds work."""
        if not self.flops.router_hidden:
            return []
        summaries = self.summary()
        return [
            f"{model} [{task}]: the routers cost more FLOPs than their skipping saved (whole-model "
            f"normalized FLOPs {summaries[task]['normalized_flops_whole_model']:.4f} >= 1.0); train smaller "
            "routers (dlmskip train --router-hidden) or for more skipping (a larger --lambda or --alpha-target)"
            for task in sorted(tasks)
            if summaries[task]["normalized_flops_whole_model"] >= 1.0
        ]
