"""The mixture-of-experts MLP of LLaDA2 and LLaDA-MoE: a router picks ``top_k`` of the routed
experts per token, their SwiGLU outputs are summed with the router's weights (in float32), and a
shared expert (when there is one) is added.

Routers (upstream ``LLaDA2MoeGate`` and LLaDA-MoE's gate, float32):
- sigmoid (LLaDA2): scores s = sigmoid(x W^T); the choice ranks s + expert_bias within the
  ``topk_group`` best of ``n_group`` contiguous groups (a group scores the sum of its two best);
  the weights are the unbiased s of the chosen, renormalised to sum 1, times ``scaling``.
- softmax (LLaDA-MoE): p = softmax(x W^T) + expert_bias ranks and weighs, unnormalised.

The experts of a layer are stored stacked ([E, 2 * hidden, d] gate and up, [E, d, hidden] down), so
all of a forward's experts run as two grouped matrix products over the token copies sorted by
expert, with no Python loop over experts and no host sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LLaDAConfig, MoEConfig

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)  # public from torch 2.13


def route(x: Tensor, gate: Tensor, expert_bias: Tensor | None, moe: MoEConfig) -> tuple[Tensor, Tensor]:
    """Chosen experts [T, k] (in the router's rank order) and their weights [T, k] float32 for
    tokens ``x`` [T, d]."""
    logits = F.linear(x.float(), gate.float())  # [T, E]
    if moe.score == "sigmoid":
        scores = torch.sigmoid(logits)
        ranked = scores if expert_bias is None else scores + expert_bias.float()
        if moe.n_group > 1:
            groups = ranked.view(len(ranked), moe.n_group, -1)
            best = groups.topk(2, dim=-1).values.sum(-1).topk(moe.topk_group, dim=-1).indices  # [T, topk_group]
            keep = torch.zeros_like(groups[..., 0], dtype=torch.bool).scatter_(1, best, True)
            ranked = ranked.masked_fill(~keep.repeat_interleave(moe.n_experts // moe.n_group, dim=1), -torch.inf)
        chosen = ranked.topk(moe.top_k, dim=-1).indices
        weights = scores.gather(1, chosen)
    else:
        scores = logits.softmax(-1)
        if expert_bias is not None:
            scores = scores + expert_bias.float()
        weights, chosen = scores.topk(moe.top_k, dim=-1)
    if moe.normalize and moe.top_k > 1:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return chosen, weights * moe.scaling


def grouped_linear(x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """``x`` [N, in] whose rows are sorted by expert (expert e owns rows offsets[e-1]..offsets[e])
    times each expert's ``weight`` [E, out, in]: [N, out]."""
    if _GROUPED_MM is not None and (x.device.type == "cpu" or x.dtype == torch.bfloat16):
        return _GROUPED_MM(x, weight.transpose(1, 2), offs=offsets)
    out = x.new_empty(len(x), weight.shape[1])  # other dtypes on a GPU: one product per expert
    bounds = [0, *offsets.tolist()]  # sync: the expert boundaries, once per layer
    for e, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        if stop > start:
            out[start:stop] = x[start:stop] @ weight[e].T
    return out


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with LLaDA's names (the shared expert's)."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.ff_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.ff_out = nn.Linear(hidden, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.ff_out(F.silu(self.ff_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Routed experts (stacked) plus the shared expert, on [B, L, d] hidden states."""

    def __init__(self, cfg: LLaDAConfig) -> None:
        super().__init__()
        moe = cfg.moe
        self.moe = moe
        d, E, h = cfg.d_model, moe.n_experts, moe.expert_hidden
        self.gate = nn.Parameter(torch.empty(E, d))
        self.register_buffer("expert_bias", torch.zeros(E) if moe.expert_bias else None)
        self.gate_up = nn.Parameter(torch.empty(E, 2 * h, d))  # per expert: gate rows, then up rows
        self.down = nn.Parameter(torch.empty(E, d, h))
        self.shared = SwiGLU(d, moe.shared_hidden) if moe.shared_hidden else None

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        chosen, weights = route(tokens, self.gate, self.expert_bias, self.moe)
        y = experts(tokens, chosen, weights, self.gate_up, self.down).view(shape)
        return y if self.shared is None else y + self.shared(x)


def experts(x: Tensor, chosen: Tensor, weights: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """sum_k weights[t, k] * expert_{chosen[t, k]}(x[t]) for tokens ``x`` [T, d], in float32, cast
    back to x's dtype (upstream's ``moe_infer``)."""
    T, k = chosen.shape
    flat = chosen.flatten()
    order = flat.argsort(stable=True)  # token copies grouped by expert
    offsets = torch.bincount(flat, minlength=gate_up.shape[0]).cumsum(0).to(torch.int32)
    gate, up = grouped_linear(x[order // k], gate_up, offsets).chunk(2, dim=-1)
    out = grouped_linear(F.silu(gate) * up, down, offsets)  # [T * k, d] in expert order
    unsorted = torch.empty_like(out).index_copy_(0, order, out)
    return (unsorted.view(T, k, -1).float() * weights[..., None]).sum(1).to(x.dtype)
