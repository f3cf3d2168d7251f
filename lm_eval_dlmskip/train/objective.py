"""The router paper's training objective on one micro-batch, and the held-out validation that
measures the routers as evaluation will run them."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import Pair
from ..models.llada import LLaDA
from ..skipping.routers import GumbelRouting, RoutedSkip, Routers
from .config import TrainConfig


@dataclass
class Batch:
    ids: Tensor  # [b, L] prompt + target, right-padded
    attention_mask: Tensor | None
    target: Tensor  # [b, L] bool: target positions
    target_len: Tensor  # [b]

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(None if t is None else t.to(device) for t in vars(self).values()))


def collate(pairs: list[Pair], pad_id: int) -> Batch:
    L = max(len(p.prompt) + len(p.target) for p in pairs)
    ids = torch.full((len(pairs), L), pad_id, dtype=torch.long)
    target = torch.zeros(len(pairs), L, dtype=torch.bool)
    attention = torch.zeros(len(pairs), L, dtype=torch.long)
    for i, p in enumerate(pairs):
        n = len(p.prompt) + len(p.target)
        ids[i, :n] = torch.tensor(p.prompt + p.target)
        target[i, len(p.prompt) : n] = True
        attention[i, :n] = 1
    return Batch(ids, None if bool(attention.all()) else attention, target, target.sum(1))


class RouterObjective(nn.Module):
    """Frozen backbone + routers; forward gives the paper's loss for one micro-batch. With
    ``block_length`` (LLaDA2) the backbone attends block-causally, as its decoding does: the
    routers learn on the hidden states they will see in evaluation."""

    def __init__(self, backbone: nn.Module, routers: Routers, cfg: TrainConfig, mask_id: int,
                 block_length: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.routers = routers
        self.cfg = cfg
        self.mask_id = mask_id
        self.block_length = block_length

    def forward(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        cfg, device = self.cfg, batch.ids.device
        b = batch.ids.shape[0]
        t = torch.rand(b, 1, device=device, generator=generator)
        p_mask = (1 - cfg.min_mask_ratio) * t + cfg.min_mask_ratio
        masked = batch.target & (torch.rand(batch.ids.shape, device=device, generator=generator) < p_mask)
        noisy = torch.where(masked, self.mask_id, batch.ids)
        positions = masked.flatten().nonzero().squeeze(1)  # sync: the count sizes the LM head
        routing = GumbelRouting(self.routers, cfg.gumbel_temperature, generator)
        logits, _ = self.backbone(noisy, batch.attention_mask, policy=routing, logits_at=positions,
                                  block_length=self.block_length)
        ce = F.cross_entropy(logits.float(), batch.ids.flatten()[positions], reduction="none")
        ce_row = torch.zeros(b, device=device).index_add_(0, positions // batch.ids.shape[1], ce) / batch.target_len
        alpha = routing.alpha()
        p = p_mask.squeeze(1)
        if cfg.target_ratio is not None:  # a budget: the routers' offset holds the ratio (budget.py), no penalty
            skip_loss = (1 - alpha) - cfg.target_ratio  # reported: training's gates against the target
            loss = ce_row / p
        else:
            skip_loss = (alpha - cfg.alpha_target).abs()
            if cfg.mask_scaling:
                loss = (ce_row + cfg.lam * skip_loss) / p
            else:
                loss = ce_row / p + cfg.lam * skip_loss
        stats = {"ce": ce_row.mean().detach(), "skip_loss": skip_loss.mean().detach(), "alpha": alpha.mean().detach(),
                 "decided_execution": routing.decided_execution().mean()}
        return loss.mean(), stats


VALIDATION_DRAWS = 4  # masked forwards per held-out example


def validation_batches(pairs: list[Pair], batch_size: int, seed: int, pad_id: int,
                       draws: int = VALIDATION_DRAWS) -> Iterator[tuple[Batch, Tensor]]:
    """The held-out forwards: every example ``draws`` times, with l of its T target tokens
    masked, l stratified over the draws (t_k = (u + k / K) mod 1, l = ceil(t_k T), at least 1) and
    the positions a uniform subset: as evaluation masks an answer (lm-eval's Monte-Carlo likelihood
    draws l uniformly in 1..T; greedy decoding passes l = T, .., 1). Never a forward with nothing
    masked, which evaluation never runs and which runs every block. Yields each batch and its
    [b, L] bool mask (on the host), with fixed draws."""
    generator = torch.Generator().manual_seed(seed + 1)
    for start in range(0, len(pairs), batch_size):
        batch = collate(pairs[start : start + batch_size], pad_id)
        offset = torch.rand(len(batch.ids), generator=generator)
        for k in range(draws):
            t = (offset + k / draws) % 1.0
            count = (t * batch.target_len).ceil().clamp(min=1).long()  # [b] tokens to mask
            scores = torch.rand(batch.ids.shape, generator=generator).masked_fill(~batch.target, 2.0)
            rank = scores.argsort(1).argsort(1)  # target positions first, in random order
            yield batch, rank < count[:, None]


@torch.no_grad()
def validate(backbone: LLaDA, routers: Routers, pairs: list[Pair], batch_size: int, seed: int, mask_id: int, pad_id: int,
             block_length: int | None = None, draws: int = VALIDATION_DRAWS) -> dict:
    """Masked CE and execution ratio as evaluation will measure them: the routers cast to the
    model's dtype (as the harness loads a checkpoint), the model in that dtype without autocast,
    RoutedSkip's decisions (argmax votes, hard tau), and block-causal attention with
    ``block_length`` (LLaDA2). Training's bf16 autocast over float32 routers flips near-tied
    votes, so its own ratio is not what lm-eval sees."""
    if not pairs:
        return {}
    device, dtype = backbone.device, backbone.dtype
    policy = RoutedSkip(copy.deepcopy(routers).to(dtype).eval(), routers.cfg.tau)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # [CE, executed share], summed over rows
    tokens, forwards = 0, 0
    for batch, masked in validation_batches(pairs, batch_size, seed, pad_id, draws):
        noisy, positions = torch.where(masked, mask_id, batch.ids), masked.flatten().nonzero().squeeze(1)
        mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
        logits, trace = backbone(noisy.to(device), mask, policy=policy, logits_at=positions.to(device),
                                 block_length=block_length)
        sums[0] += F.cross_entropy(logits.float(), batch.ids.flatten()[positions].to(device), reduction="sum")
        sums[1] += trace.executed.double().mean(1).sum()
        tokens += len(positions)
        forwards += len(masked)
    ce, executed = sums.tolist()  # sync: once per validation
    return {"val_ce": ce / max(tokens, 1), "val_execution_ratio": executed / forwards, "val_dtype": str(dtype).removeprefix("torch.")}
