"""Learned routers, the dynamic method (router paper, Sec. 3.2 and Alg. 1), and their checkpoints.

One small MLP in front of every block reads the hidden states entering it and gives each token two
logits, [skip, execute]. At inference every currently masked position votes by argmax; a row skips
the block when its share of skip votes exceeds ``tau`` (default 0.1). Decisions are per row
(sequence level); a row with no masked position runs every block. The MLP is applied densely to
all positions and the votes are then read at the masked ones (the paper's App. A.3 layout).

Default MLP, as the public D-LLM router the paper builds on:
``Linear(d, h) -> RMSNorm(h) -> SiLU -> Linear(h, 2)`` with h = d / 8 (the paper's 512 on
LLaDA-8B's d = 4096); ``norm_first`` gives ``RMSNorm(d) -> Linear -> SiLU -> Linear``. The last
bias starts with execute ``init_bias`` above skip, so at the start of training almost no token
votes skip and every block runs.

``mask_ratio`` (opt-in, ``dlmskip train --router-mask-ratio``): the router also reads its row's
masking ratio r (``ForwardBatch.mask_ratio``: masked over real positions of the whole row), as
``r * w_r`` added to its first hidden layer, w_r [h] a learned vector that starts at zero (training
starts from the plain router). The paper scales the skip loss by 1 / p_mask because redundancy grows
as denoising proceeds; here the router can see how far it has come. One extra parameter at the end
of the router's parameter list, so ``router_logits`` stays one function of the parameters.

Their checkpoints are router_checkpoints.py's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..common.norms import RMSNorm, rms_norm
from .policies import Decision, ForwardBatch

SKIP, EXECUTE = 0, 1  # logit order, as in the paper and D-LLM


def default_hidden(d_model: int) -> int:
    """d_model / 8: the paper's 512 on LLaDA-8B (d_model 4096), and a router near 1% of a block's
    FLOPs at any LLaDA shape (a fixed 512 costs 15% of a block of a d_model-256 model)."""
    return max(1, d_model // 8)


@dataclass(frozen=True)
class RouterConfig:
    d_model: int
    n_layers: int
    hidden: int | None = None  # None: default_hidden(d_model)
    depth: int = 2  # linear layers per router (the paper also tried 4)
    norm_first: bool = False
    init_bias: float = 4.0  # execute logit minus skip logit at initialisation
    tau: float = 0.1
    eps: float = 1e-5
    keep: tuple[int, ...] = ()  # 0-based blocks that always run: no router decides them
    mask_ratio: bool = False  # the first hidden layer also gets r * w_r, r the row's masking ratio

    def __post_init__(self) -> None:
        if self.hidden is None:
            object.__setattr__(self, "hidden", default_hidden(self.d_model))
        object.__setattr__(self, "keep", tuple(sorted(self.keep)))  # a JSON list, read back

    @property
    def routed(self) -> int:
        """Blocks a router decides (the others always run)."""
        return self.n_layers - len(self.keep)

    def check(self) -> None:
        if self.depth < 2:
            raise ValueError(f"router depth={self.depth}: a router has at least 2 linear layers")
        if self.hidden < 1:
            raise ValueError(f"router hidden={self.hidden} must be >= 1 (leave it unset for d_model / 8)")
        if not 0 <= self.tau < 1:
            raise ValueError(f"tau={self.tau} must be in [0, 1)")
        if len(set(self.keep)) != len(self.keep) or not all(0 <= b < self.n_layers for b in self.keep):
            raise ValueError(f"--keep-blocks {','.join(map(str, self.keep))} (\"keep\" in router.json): give distinct 0-based "
                             f"blocks in 0..{self.n_layers - 1} (the papers number them 1..{self.n_layers})")


class Router(nn.Module):
    """Token logits [.., 2] (skip, execute) for the hidden states entering one block."""

    def __init__(self, cfg: RouterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, h = cfg.d_model, cfg.hidden
        if cfg.norm_first:
            layers: list[nn.Module] = [RMSNorm(d, cfg.eps), nn.Linear(d, h), nn.SiLU()]
            layers += [m for _ in range(cfg.depth - 2) for m in (nn.Linear(h, h), nn.SiLU())]
        else:
            layers = [nn.Linear(d, h), RMSNorm(h, cfg.eps), nn.SiLU()]
            layers += [m for _ in range(cfg.depth - 2) for m in (nn.Linear(h, h), RMSNorm(h, cfg.eps), nn.SiLU())]
        self.net = nn.Sequential(*layers, nn.Linear(h, 2))
        with torch.no_grad():
            self.net[-1].bias.copy_(torch.tensor([0.0, cfg.init_bias]))
        if cfg.mask_ratio:
            self.ratio_weight = nn.Parameter(torch.zeros(h))  # w_r [h]

    def weights(self) -> list[Tensor]:
        """The parameters in ``router_logits``' order: ``net``'s, then w_r (``parameters()`` would
        give w_r first: a module's own parameters come before its children's)."""
        return [*self.net.parameters(), *([self.ratio_weight] if self.cfg.mask_ratio else [])]

    def forward(self, h: Tensor, ratio: Tensor | None = None) -> Tensor:
        return router_logits(h.to(self.net[-1].weight.dtype), self.weights(), self.cfg, ratio)


def router_logits(h: Tensor, params: list[Tensor], cfg: RouterConfig, ratio: Tensor | None = None) -> Tensor:
    """The router MLP as a function of its parameters (``Router.weights()``: ``net``'s, then w_r
    with ``cfg.mask_ratio``), so one compiled graph serves the routers of every block.
    h [B, L, d]; ratio [B], each row's masking ratio, read only with ``cfg.mask_ratio``."""
    shift = None
    if cfg.mask_ratio:
        if ratio is None:
            raise ValueError("these routers read each row's masking ratio (mask_ratio); pass ForwardBatch.mask_ratio")
        *params, ratio_weight = params
        shift = ratio.to(ratio_weight.dtype)[:, None, None] * ratio_weight  # [B, 1, h]
    p = iter(params)
    x = h
    if cfg.norm_first:
        x = rms_norm(x, next(p), cfg.eps)
    for layer in range(cfg.depth - 1):
        x = F.linear(x, next(p), next(p))
        if layer == 0 and shift is not None:
            x = x + shift
        x = F.silu(x if cfg.norm_first else rms_norm(x, next(p), cfg.eps))
    return F.linear(x, next(p), next(p))


class Routers(nn.Module):
    """One router per block."""

    def __init__(self, cfg: RouterConfig) -> None:
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.routers = nn.ModuleList(Router(cfg) for _ in range(cfg.n_layers))

    def forward(self, layer: int, h: Tensor, ratio: Tensor | None = None) -> Tensor:
        return self.routers[layer](h, ratio)


def skip_share(votes_skip: Tensor, masked: Tensor) -> tuple[Tensor, Tensor]:
    """Share [B] of skip votes over each row's masked positions, and whether the row has any."""
    count = masked.sum(1)
    share = (votes_skip * masked).sum(1) / count.clamp(min=1)
    return share, count > 0


def runs_block(logits: Tensor, masked: Tensor, tau: float) -> Tensor:
    """[B] bool, True = run the block: the inference rule, in one place for RoutedSkip and for the
    budget training measures. Argmax votes of the logits [B, L, 2] at the masked positions [B, L];
    skip when their skip share exceeds tau; a row without masked positions runs."""
    share, has_masked = skip_share((logits.argmax(-1) == SKIP).float(), masked.float())
    return ~((share > tau) & has_masked)


def routed_decision(h: Tensor, params: list[Tensor], masked: Tensor, tau: float, cfg: RouterConfig,
                    ratio: Tensor | None = None) -> Tensor:
    """[B] bool, True = run the block: ``runs_block`` on the router's logits for ``h`` (``ratio``:
    the rows' masking ratios, for routers with ``cfg.mask_ratio``)."""
    return runs_block(router_logits(h.to(params[0].dtype), params, cfg, ratio), masked, tau)


@dataclass(frozen=True)
class RoutedSkip:
    """Inference policy: the routers' votes decide, per row, which blocks run."""

    routers: Routers
    tau: float
    decide: Callable = routed_decision

    @property
    def routed_layers(self) -> int:
        return self.routers.cfg.routed  # every block but those kept consults its router (its FLOPs are counted)

    def compiled(self) -> "RoutedSkip":
        """The same decisions from one compiled graph (router MLP, votes and threshold fused)."""
        return replace(self, decide=torch.compile(routed_decision))

    def rows_to_run(self, layer: int, h: Tensor, batch: ForwardBatch) -> Decision:
        if layer in self.routers.cfg.keep:  # host-known: no router graph, no read-back
            return True
        params = self.routers.routers[layer].weights()
        return self.decide(h, params, batch.masked, self.tau, self.routers.cfg, batch.mask_ratio)


class GumbelRouting:
    """Training policy for one forward pass: Gumbel-softmax votes (hard, straight-through), their
    mean over masked positions, a hard gate at tau with the straight-through estimator. Returns
    the execute gate e1 in {0, 1} (differentiable) and keeps each block's skip gate e0 for the
    skip loss (alpha = mean of e0 over blocks)."""

    def __init__(self, routers: Routers, temperature: float, generator: torch.Generator | None) -> None:
        self.routers = routers
        self.tau = routers.cfg.tau
        self.temperature = temperature
        self.generator = generator
        self.skip_gates: list[Tensor] = []  # [B] per block
        self.decided: list[Tensor] = []  # [B] per block: 1 = runs_block (RoutedSkip's rule) runs it

    def noise(self, shape: torch.Size, device: torch.device) -> Tensor:
        """Gumbel(0, 1) samples -log(-log u) from uniforms u of the generator."""
        uniform = torch.rand(shape, device=device, generator=self.generator)
        exponential = -torch.log(uniform.clamp(min=1e-20))
        return -torch.log(exponential.clamp(min=1e-20))

    def rows_to_run(self, layer: int, h: Tensor, batch: ForwardBatch) -> Decision:
        if layer in self.routers.cfg.keep:  # always runs: a skip gate of 0 in alpha, no gradient
            run = torch.ones(h.shape[0], device=h.device)
            self.skip_gates.append(1.0 - run)
            self.decided.append(run)
            return run
        logits = self.routers(layer, h, batch.mask_ratio).float()
        soft = F.softmax((logits + self.noise(logits.shape, logits.device)) / self.temperature, dim=-1)
        hard = F.one_hot(soft.argmax(-1), 2).to(soft.dtype)
        votes = hard + (soft - soft.detach())  # exactly one-hot forward, softmax gradient
        share, has_masked = skip_share(votes[..., SKIP], batch.masked.float())
        gate = ((share > self.tau) & has_masked).to(share.dtype)
        skip = gate + (share - share.detach())  # exactly 0 or 1 forward, gradient to the share
        self.skip_gates.append(skip)
        self.decided.append(runs_block(logits, batch.masked, self.tau).float())
        return 1.0 - skip  # execute gate: h + e1 (f(h) - h)

    def alpha(self) -> Tensor:
        """[B] share of skipped blocks per row (the paper's alpha)."""
        return torch.stack(self.skip_gates, 1).mean(1)

    def decided_execution(self) -> Tensor:
        """[B] share of blocks each row would run under inference's rule on these hidden states (no
        noise: argmax votes, skip share strictly above tau): what a budget is measured in."""
        return torch.stack(self.decided, 1).mean(1)
