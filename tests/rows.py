"""Helpers for "a row of a batch decodes as it does alone": padded batches of prompts of mixed
lengths, skip policies whose per-row decisions depend on the row alone, and a denoiser that logs
every forward (logits, the blocks each row ran, what the policy asked) so that a batch can be
compared with each row decoded alone forward by forward. Used by test_cache_rows.py on the CPU
and test_gpu_paths.py on the GPU."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lm_eval_dlmskip.decoding.generate import GenerationSettings, generate
from lm_eval_dlmskip.skipping.policies import Decision, ForwardBatch
from lm_eval_dlmskip.skipping.routers import RouterConfig, Routers

from .conftest import EOS_ID, MASK_ID


def padded(prompts: list[list[int]], device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """Left-padded ids [B, P] and attention mask of prompts of different lengths."""
    P = max(map(len, prompts))
    ids = torch.full((len(prompts), P), EOS_ID)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1
    return ids.to(device), mask.to(device)


def random_prompts(n: int, seed: int) -> list[list[int]]:
    """n prompts of 3 to 12 plain tokens (never the mask or EOS), lengths drawn per prompt."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 240, (int(torch.randint(3, 13, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


def tiny_routers(seed: int, device: str | torch.device = "cpu") -> Routers:
    """Routers for the fixture model whose votes split rows: random output weights, no bias toward
    executing."""
    torch.manual_seed(seed)
    routers = Routers(RouterConfig(d_model=64, n_layers=6, hidden=16, init_bias=0.0))
    for r in routers.routers:
        torch.nn.init.normal_(r.net[-1].weight, std=3.0)
    return routers.to(device)


class ProgressSkip:
    """Row b skips block l when (mask tokens row b has left among the computed positions + l) is a
    multiple of 3: a per-row [B] decision that depends on the row alone. Under the fixed schedule
    every row has as many masks left as every other, so all rows agree on every block; under a
    threshold they part."""

    def rows_to_run(self, layer: int, h: Tensor, batch: ForwardBatch) -> Decision:
        return (batch.masked.sum(1) + layer) % 3 != 0

    def __repr__(self) -> str:
        return "ProgressSkip()"


@dataclass
class Forward:
    block: int  # semi-autoregressive block, counted from the end of the canvas (-1: the last)
    fill: bool  # a full forward (it fills the cache when there is one)
    logits: Tensor  # [B, W, V]
    executed: Tensor  # [B, n_layers] the blocks each row ran
    asked: Tensor | None  # [B, n_layers] what the policy answered, before any cache rule; None: not asked


class ForwardLog:
    """A denoiser over ``forward`` (the model or a GraphRunner) that logs every forward. With
    ``ask`` the policy is asked through this object, which records its answers: only for the eager
    model (a GraphRunner asks a policy at capture, and keys its router graphs by the policy)."""

    def __init__(self, forward, policy, settings: GenerationSettings, ask: bool = False) -> None:
        self.forward, self.policy, self.settings, self.ask = forward, policy, settings, ask
        self.forwards: list[Forward] = []
        self._asked: list[Tensor] = []

    @property
    def routed_layers(self) -> int:
        return getattr(self.policy, "routed_layers", 0)

    def rows_to_run(self, layer: int, h: Tensor, batch: ForwardBatch) -> Decision:
        run = self.policy.rows_to_run(layer, h, batch)
        self._asked.append(run.bool() if isinstance(run, Tensor) else torch.full((h.shape[0],), run, device=h.device))
        return run

    def __call__(self, ids, attention_mask, logits_at, cache=None, window=None):
        self._asked = []
        policy = self if self.ask else self.policy
        logits, trace = self.forward(ids, attention_mask, policy=policy, logits_at=logits_at, cache=cache, window=window)
        if window is None:  # the block whose columns the full forward decodes; a window stays in it
            block = (logits_at.stop - ids.shape[1]) // self.settings.block_length - 1
        else:
            block = self.forwards[-1].block
        asked = torch.stack(self._asked, 1) if self._asked else None
        self.forwards.append(Forward(block, window is None, logits.clone(), trace.executed.clone(), asked))
        return logits

    def of_block(self, block: int) -> list[Forward]:
        return [f for f in self.forwards if f.block == block]


def decode(forward, policy, prompts: list[list[int]], settings: GenerationSettings,
           device: str | torch.device = "cpu", ask: bool = False) -> tuple[Tensor, ForwardLog]:
    """The answers [B, gen_length] of a left-padded batch of ``prompts`` (no mask when alone) and
    the log of its forwards (``ask``: with the policy's own answers)."""
    log = ForwardLog(forward, policy, settings, ask)
    if len(prompts) == 1:
        ids, mask = torch.tensor(prompts, device=device), None
    else:
        ids, mask = padded(prompts, device)
    out = generate(log, ids, mask, settings, MASK_ID)
    return out[:, ids.shape[1]:], log


def assert_rows_as_alone(batch: ForwardLog, row: int, alone: ForwardLog, atol: float) -> None:
    """Row ``row`` of the batch went through the forwards of the row decoded alone: per semi-AR
    block the same forwards (fill or window) in the same order, the same blocks run, logits within
    ``atol``. Under a threshold the batch may take more forwards in a block (its rows finish at
    different steps); the row's are the first ones."""
    blocks = sorted({f.block for f in alone.forwards})
    assert blocks == sorted({f.block for f in batch.forwards})
    for block in blocks:
        ours, theirs = batch.of_block(block), alone.of_block(block)
        if batch.settings.threshold is None:
            assert len(ours) == len(theirs)
        assert len(ours) >= len(theirs)
        for step, (f, g) in enumerate(zip(ours, theirs)):
            where = f"row {row}, block {block}, forward {step}"
            assert f.fill == g.fill, where
            assert torch.equal(f.executed[row], g.executed[0]), where
            assert torch.allclose(f.logits[row], g.logits[0], atol=atol, rtol=0), (where, (f.logits[row] - g.logits[0]).abs().max())


def assert_same_forwards(ours: ForwardLog, theirs: ForwardLog, atol: float) -> None:
    """Two decodes of one batch went through the same forwards: fill or window, the blocks each row
    ran, finite logits within ``atol``."""
    assert [(f.block, f.fill) for f in ours.forwards] == [(f.block, f.fill) for f in theirs.forwards]
    for step, (f, g) in enumerate(zip(ours.forwards, theirs.forwards)):
        assert torch.equal(f.executed, g.executed), step
        assert f.logits.isfinite().all() and g.logits.isfinite().all(), step
        diff = float((f.logits.float() - g.logits.float()).abs().max())
        assert diff <= atol, (step, diff)
