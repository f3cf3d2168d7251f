"""The router-training objective (issue 16, item 7), computed by hand from the router paper's
definitions (Sec. 3.2-3.3, Eq. 5-10) for one block with fixed router weights and fixed noise:
Gumbel noise -log(-log u) of the uniforms, soft = softmax((logits + g) / T), hard one-hot votes
with the straight-through gradient of soft, the skip share over masked positions only, the gate
1(share > tau) with the straight-through gradient of the share, alpha = the mean gate over blocks,
the skip term |alpha - alpha_target| per row, the loss (CE + lambda skip) / p_mask, and the
gradient w.r.t. the router's last layer. Then: with the noise at zero, training's hard decisions
are the ones RoutedSkip (what lm_eval runs) makes on the same hidden states."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lm_eval_dlmskip.data import Pair
from lm_eval_dlmskip.models.llada import LLaDA
from lm_eval_dlmskip.skipping.policies import NO_SKIP, ForwardBatch
from lm_eval_dlmskip.skipping.routers import GumbelRouting, RoutedSkip, RouterConfig, Routers
from lm_eval_dlmskip.train.config import TrainConfig
from lm_eval_dlmskip.train.objective import RouterObjective, collate

from .conftest import MASK_ID

PAD_ID = 251


def router_by_hand(h: torch.Tensor, router) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [.., 2] (skip, execute) of Linear -> RMSNorm -> SiLU -> Linear, and the input of the
    last Linear, in plain arithmetic."""
    first, norm, _, last = router.net
    pre = h @ first.weight.T + first.bias
    normed = pre / torch.sqrt((pre * pre).mean(-1, keepdim=True) + router.cfg.eps) * norm.weight
    x = normed / (1 + torch.exp(-normed))
    return x @ last.weight.T + last.bias, x


def gumbel_by_hand(generator_seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The uniforms a generator seeded so draws first, made Gumbel(0, 1)."""
    u = torch.rand(shape, generator=torch.Generator().manual_seed(generator_seed))
    return -torch.log(-torch.log(u))


def soft_skip_by_hand(logits: torch.Tensor, gumbel: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax((logits + g) / T) of the skip logit, written for two classes."""
    z = (logits + gumbel) / temperature
    return 1 / (1 + torch.exp(z[..., 1] - z[..., 0]))


def _fixed_block(tau: float) -> tuple[Routers, torch.Tensor, ForwardBatch]:
    """One block's router (d_model = hidden = 4), the hidden states [3, 6, 4] entering the block,
    all rounded to one decimal, and the rows' masks."""
    g = torch.Generator().manual_seed(11)
    h = torch.randn(3, 6, 4, generator=g).round(decimals=1)
    routers = Routers(RouterConfig(d_model=4, n_layers=1, hidden=4, tau=tau))
    first, norm, _, last = routers.routers[0].net
    with torch.no_grad():
        first.weight.copy_(torch.randn(4, 4, generator=g).round(decimals=1))
        first.bias.copy_(torch.randn(4, generator=g).round(decimals=1))
        norm.weight.copy_((1 + 0.5 * torch.randn(4, generator=g)).round(decimals=1))
        last.weight.copy_(torch.randn(2, 4, generator=g).round(decimals=1))
        last.bias.copy_(torch.tensor([0.0, 0.3]))
    ids = torch.full((3, 6), 7)
    ids[0, 2:6] = MASK_ID  # masked 2..5; 0 and 1 are prompt positions that vote skip
    ids[1, [1, 2, 4]] = MASK_ID
    ids[2, [1, 4]] = MASK_ID
    return routers, h, ForwardBatch.of(ids, None, MASK_ID)


def test_gumbel_routing_of_one_block_by_hand():
    """Three rows at tau = 0.25: one skip vote of 4 masked positions (exactly tau: runs), 2 of 3
    (skips), 0 of 2 (runs); unmasked positions vote skip and must not count."""
    tau, temperature, seed = 0.25, 0.5, 5
    routers, h, batch = _fixed_block(tau)
    routing = GumbelRouting(routers, temperature, torch.Generator().manual_seed(seed))
    execute = routing.rows_to_run(0, h, batch)
    weight = torch.tensor([1.0, -2.0, 0.5])  # any fixed weighting of the rows' alpha
    (weight * routing.alpha()).sum().backward()

    logits, x = router_by_hand(h, routers.routers[0])
    soft = soft_skip_by_hand(logits, gumbel_by_hand(seed, (3, 6, 2)), temperature)
    votes = (soft > 0.5).float()  # the one-hot vote: skip where its soft share wins
    assert votes.tolist() == [[1, 1, 1, 0, 0, 0], [0, 0, 1, 0, 1, 0], [1, 0, 1, 1, 0, 1]]
    masked = batch.masked.float()
    count = masked.sum(1)
    share = (votes * masked).sum(1) / count
    assert share.tolist() == pytest.approx([0.25, 2 / 3, 0.0])
    gate = (share > tau).float()
    assert gate.tolist() == [0.0, 1.0, 0.0]
    assert execute.tolist() == [1.0, 0.0, 1.0] and routing.alpha().tolist() == gate.tolist()
    # d alpha_b / d share_b = 1 (straight-through gate), d vote / d soft = 1 (straight-through
    # votes), d soft_skip / d logit_skip = soft (1 - soft) / T = -d soft_skip / d logit_execute.
    slope = weight[:, None] * masked / count[:, None] * soft * (1 - soft) / temperature  # [B, L]
    skip_row = torch.einsum("bl,blh->h", slope, x)
    last = routers.routers[0].net[-1]
    assert torch.allclose(last.weight.grad, torch.stack([skip_row, -skip_row]), atol=1e-6)
    assert torch.allclose(last.bias.grad, torch.stack([slope.sum(), -slope.sum()]), atol=1e-6)


class NoiselessRouting(GumbelRouting):
    """Training's routing with the Gumbel noise at zero."""

    def noise(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        return torch.zeros(shape, device=device)


@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_without_noise_training_decides_as_inference_on_the_same_hidden_states(temperature):
    routers, h, batch = _fixed_block(0.25)
    logits, _ = router_by_hand(h, routers.routers[0])
    votes = (logits[..., 0] > logits[..., 1]).float()  # argmax votes
    share = (votes * batch.masked).sum(1) / batch.masked.sum(1)
    assert share.tolist() == [0.5, pytest.approx(1 / 3), 0.0]
    for tau, expected in ((0.25, [False, False, True]), (0.5, [True, True, True])):  # row 0 at tau 0.5 runs
        routers, _, _ = _fixed_block(tau)
        trained = NoiselessRouting(routers, temperature, None).rows_to_run(0, h, batch)
        assert trained.bool().tolist() == expected
        assert RoutedSkip(routers, tau).rows_to_run(0, h, batch).tolist() == expected


def test_training_and_inference_run_the_same_blocks_of_the_whole_model(ref_model):
    """Every block of the 6-block model, rows that skip some blocks and run others: without noise,
    the gates training applies are the blocks RoutedSkip runs (so later blocks see the same states)."""
    torch.manual_seed(4)
    routers = Routers(RouterConfig(d_model=64, n_layers=6, hidden=16, init_bias=0.0, tau=0.1))
    for router in routers.routers:
        torch.nn.init.normal_(router.net[-1].weight, std=3.0)
    ids = torch.randint(0, 240, (6, 14), generator=torch.Generator().manual_seed(0))
    ids[torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.5] = MASK_ID
    attention = torch.ones_like(ids)
    attention[4, :3] = 0  # a left-padded row
    with torch.no_grad():
        routing = NoiselessRouting(routers, 1.0, None)
        ref_model(ids, attention, policy=routing)
        _, trace = ref_model(ids, attention, policy=RoutedSkip(routers, 0.1))
    trained = 1 - torch.stack(routing.skip_gates, 1)
    assert 0 < trained.sum() < trained.numel()  # some blocks skipped, some run
    assert trained.bool().tolist() == trace.executed.tolist()


def _one_block(ref_model) -> LLaDA:
    """The fixture model cut to its first block (embedding, block 0, final norm, LM head)."""
    model = LLaDA(replace(ref_model.cfg, n_layers=1))
    state = {k: v for k, v in ref_model.state_dict().items() if not k.startswith("blocks.") or k.startswith("blocks.0.")}
    model.load_state_dict(state, strict=True)
    return model.requires_grad_(False)


def _loss_by_hand(backbone: LLaDA, routers: Routers, batch, cfg: TrainConfig, seed: int):
    """The paper's loss and its gradient w.r.t. the router's last weights, by hand."""
    B, L = batch.ids.shape
    g = torch.Generator().manual_seed(seed)
    p = (1 - cfg.min_mask_ratio) * torch.rand(B, 1, generator=g)[:, 0] + cfg.min_mask_ratio
    masked = batch.target & (torch.rand(B, L, generator=g) < p[:, None])
    gumbel = -torch.log(-torch.log(torch.rand(B, L, 2, generator=g)))
    noisy = torch.where(masked, MASK_ID, batch.ids)
    mcfg = backbone.cfg
    assert not (mcfg.input_emb_norm or mcfg.scale_logits or mcfg.weight_tying)
    h0 = backbone.wte.weight[noisy]  # [B, L, D] the block's input
    with torch.no_grad():
        run, _ = backbone.trunk(noisy, batch.attention_mask, NO_SKIP)  # the frozen block's output f(h0)
    logits, x = router_by_hand(h0, routers.routers[0])
    soft = soft_skip_by_hand(logits, gumbel, cfg.gumbel_temperature)
    votes = (soft > 0.5).float()
    count = masked.sum(1)
    share = (votes * masked).sum(1) / count
    gate = ((share > routers.cfg.tau) & (count > 0)).float()  # e0: skip
    alpha = gate  # one block: the mean over blocks is the block's gate
    h1 = h0 + (1 - gate)[:, None, None] * (run - h0)
    # LM head: RMSNorm then the output matrix; CE at the masked positions over the target length
    rms = 1 / torch.sqrt((h1 * h1).mean(-1, keepdim=True) + mcfg.rms_norm_eps)
    out = (h1 * rms * backbone.ln_f.weight) @ backbone.ff_out.weight.T
    ce = torch.logsumexp(out, -1) - out.gather(-1, batch.ids[..., None])[..., 0]
    ce_row = (ce * masked).sum(1) / batch.target_len
    skip = (alpha - cfg.alpha_target).abs()
    per_row = (ce_row + cfg.lam * skip) / p if cfg.mask_scaling else ce_row / p + cfg.lam * skip
    # d CE_b / d e1_b: the block's change (run - h0) against the CE gradient through head and norm
    delta = torch.softmax(out, -1) - torch.nn.functional.one_hot(batch.ids, out.shape[-1])
    wa = backbone.ln_f.weight * (delta @ backbone.ff_out.weight)  # d CE / d (normed h1), times the norm weight
    grad_h1 = rms * wa - rms**3 / h1.shape[-1] * h1 * (h1 * wa).sum(-1, keepdim=True)
    dce_dexecute = ((grad_h1 * (run - h0)).sum(-1) * masked).sum(1) / batch.target_len
    dskip = cfg.lam * torch.sign(alpha - cfg.alpha_target)
    dce_dgate = -dce_dexecute
    dloss_dgate = ((dce_dgate + dskip) / p if cfg.mask_scaling else dce_dgate / p + dskip) / B
    slope = dloss_dgate[:, None] * masked / count.clamp(min=1)[:, None] * soft * (1 - soft) / cfg.gumbel_temperature
    skip_row = torch.einsum("bl,blh->h", slope, x)
    return per_row.mean(), {"share": share, "gate": gate, "ce": ce_row, "p": p}, torch.stack([skip_row, -skip_row])


@pytest.mark.parametrize("mask_scaling", [True, False])
def test_router_objective_of_one_block_by_hand(ref_model, mask_scaling):
    """Three padded rows of the one-block model, tau 0.25, T 0.5: two rows skip, one runs; the loss
    and the gradient reaching the router's last layer (through the CE and the skip term) as by hand."""
    backbone = _one_block(ref_model)
    torch.manual_seed(0)
    routers = Routers(RouterConfig(d_model=64, n_layers=1, hidden=8, init_bias=0.0, tau=0.25))
    torch.nn.init.normal_(routers.routers[0].net[-1].weight, std=1.0)
    batch = collate([Pair([1, 2, 3], [4, 5, 6, 7, 8, 9]), Pair([9, 10], [11, 12, 13, 14]),
                     Pair([20, 21, 22, 23], [24, 25, 26, 27, 28])], PAD_ID)
    cfg = TrainConfig(model="m", output="o", data="d", lam=0.7, alpha_target=0.4, gumbel_temperature=0.5,
                      mask_scaling=mask_scaling)
    loss, stats = RouterObjective(backbone, routers, cfg, MASK_ID)(batch, torch.Generator().manual_seed(2))
    loss.backward()
    expected, parts, grad = _loss_by_hand(backbone, routers, batch, cfg, seed=2)
    assert parts["share"].tolist() == pytest.approx([0.5, 0.0, 0.6]) and parts["gate"].tolist() == [1.0, 0.0, 1.0]
    assert stats["alpha"].item() == pytest.approx(2 / 3)
    assert stats["ce"].item() == pytest.approx(parts["ce"].mean().item(), rel=1e-5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(routers.routers[0].net[-1].weight.grad, grad, rtol=1e-4, atol=1e-7)
