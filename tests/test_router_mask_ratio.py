"""Mask-ratio-aware routers (issue 20, item 3; ``dlmskip train --router-mask-ratio``): the ratio a
forward computes against a hand count, routers whose decisions follow it (logits by hand from the
parameters), training and inference reading the same ratio (eager, compiled and graph paths), the
flag off giving exactly the old logits, checkpoints with and without the field, a few training steps
with the flag, and what the router FLOPs count."""

from __future__ import annotations

import json
from dataclasses import replace

import torch

from lm_eval_dlmskip.decoding.graphs import GraphRunner
from lm_eval_dlmskip.models.loading import load_llada
from lm_eval_dlmskip.skipping.flops import FlopsModel
from lm_eval_dlmskip.skipping.identity import model_identity
from lm_eval_dlmskip.skipping.policies import ForwardBatch
from lm_eval_dlmskip.skipping.router_checkpoints import load_routers, save_routers
from lm_eval_dlmskip.skipping.routers import GumbelRouting, RoutedSkip, RouterConfig, Routers
from lm_eval_dlmskip.train.loop import train

from .conftest import MASK_ID
from .test_router import _config

M = MASK_ID


def test_the_mask_ratio_is_masked_over_real_positions_of_the_whole_row():
    """Hand counts: padding is neither masked nor counted, a window forward keeps the whole row's ratio,
    and a row's ratio is the same whether or not a batch pads it."""
    ids = torch.tensor([
        [0, 0, 5, M, M, M],  # 2 padding, 4 real, 3 masked -> 3/4
        [5, 6, 7, 8, M, M],  # 6 real, 2 masked -> 1/3
        [0, 5, 6, 7, 8, 9],  # nothing masked -> 0
        [M, M, M, M, M, M],  # M at the 2 padded positions is padding, not a mask: 4/4
    ])
    attention = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6, [0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    batch = ForwardBatch.of(ids, attention, MASK_ID)
    expected = torch.tensor([3 / 4, 1 / 3, 0.0, 1.0])
    assert torch.allclose(batch.mask_ratio, expected) and batch.mask_ratio.dtype == torch.float32
    assert torch.equal(batch.window(slice(4, 6)).mask_ratio, batch.mask_ratio)  # columns 4..5: all masked, not 1.0
    alone = ForwardBatch.of(ids[:1, 2:], None, MASK_ID)  # row 0 without its padding
    assert torch.allclose(alone.mask_ratio, expected[:1])


def _hand_router(d: int = 4, h: int = 4, norm_first: bool = False) -> Routers:
    """One ratio-aware router whose hidden units 0 and 1 follow the ratio (first-layer bias (2, -2,
    0, 1) plus r * w_r, w_r = (-4, 4, 2, 0), small random weights on h) and whose skip logit is unit 0
    minus unit 1: a row far in its denoising (low r) votes skip, an early one (high r) execute."""
    routers = Routers(RouterConfig(d_model=d, n_layers=1, hidden=h, init_bias=0.0, mask_ratio=True, norm_first=norm_first))
    router = routers.routers[0]
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in router.weights():
            p.copy_(0.1 * torch.randn(p.shape, generator=generator))
        first = router.net[1] if norm_first else router.net[0]
        first.bias.copy_(torch.tensor([2.0, -2.0, 0.0, 1.0]))
        router.ratio_weight.copy_(torch.tensor([-4.0, 4.0, 2.0, 0.0]))
        router.net[0 if norm_first else 1].weight.fill_(1.0)  # the RMSNorm's scale
        router.net[-1].weight.copy_(torch.tensor([[3.0, -3.0, 1.0, 0.5], [-3.0, 3.0, 0.0, 0.5]]))
    return routers


def _hand_logits(routers: Routers, h: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """Linear(d, h)(x) + r * w_r -> RMSNorm -> SiLU -> Linear(h, 2), written out with torch ops."""
    router = routers.routers[0]
    first, norm, last = router.net[0], router.net[1], router.net[3]
    x = h @ first.weight.T + first.bias + ratio[:, None, None] * router.ratio_weight
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + routers.cfg.eps) * norm.weight
    x = x * torch.sigmoid(x)
    return x @ last.weight.T + last.bias


def _two_rows_that_differ_in_their_ratio() -> tuple[torch.Tensor, ForwardBatch]:
    """Two rows with the same hidden states and masked positions; only their ratios differ."""
    h = torch.randn(1, 5, 4, generator=torch.Generator().manual_seed(0)).expand(2, 5, 4).contiguous()
    batch = ForwardBatch.of(torch.full((2, 5), MASK_ID), None, MASK_ID)
    return h, replace(batch, mask_ratio=torch.tensor([0.1, 0.9]))


def test_a_ratio_aware_router_decides_by_the_rows_ratio_as_computed_by_hand():
    routers = _hand_router()
    h, batch = _two_rows_that_differ_in_their_ratio()
    with torch.no_grad():
        expected_logits = _hand_logits(routers, h, batch.mask_ratio)
        assert torch.allclose(routers(0, h, batch.mask_ratio), expected_logits, atol=1e-5)
    votes_skip = (expected_logits.argmax(-1) == 0).float().mean(1)
    expected = ~(votes_skip > 0.1)
    assert expected.tolist() == [False, True]  # the hand weights make the ratio decide: r 0.1 skips, r 0.9 runs
    policy = RoutedSkip(routers, 0.1)
    assert policy.rows_to_run(0, h, batch).tolist() == expected.tolist()
    assert policy.compiled().rows_to_run(0, h, batch).tolist() == expected.tolist()
    routing = GumbelRouting(routers, temperature=1.0, generator=torch.Generator().manual_seed(1))
    routing.rows_to_run(0, h, batch)
    assert routing.decided[0].bool().tolist() == expected.tolist()  # training decides with the same ratio


def test_the_norm_first_variant_adds_the_ratio_term_to_its_first_hidden_layer():
    routers = _hand_router(norm_first=True)
    router = routers.routers[0]
    h, batch = _two_rows_that_differ_in_their_ratio()
    norm, first, last = router.net[0], router.net[1], router.net[3]
    x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + routers.cfg.eps) * norm.weight
    x = x @ first.weight.T + first.bias + batch.mask_ratio[:, None, None] * router.ratio_weight
    expected = (x * torch.sigmoid(x)) @ last.weight.T + last.bias
    with torch.no_grad():
        assert torch.allclose(routers(0, h, batch.mask_ratio), expected, atol=1e-5)


def test_without_the_flag_the_logits_are_exactly_the_old_routers():
    """The old formula by hand; a ratio-aware router with w_r = 0 (as training starts) gives the same."""
    torch.manual_seed(0)
    plain = Routers(RouterConfig(d_model=8, n_layers=1, hidden=4, init_bias=0.0))
    h = torch.randn(3, 5, 8)
    ratio = torch.tensor([0.2, 0.5, 1.0])
    first, norm, last = plain.routers[0].net[0], plain.routers[0].net[1], plain.routers[0].net[3]
    with torch.no_grad():
        x = h @ first.weight.T + first.bias
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
        expected = (x * torch.sigmoid(x)) @ last.weight.T + last.bias
        got = plain(0, h)
        assert torch.allclose(got, expected, atol=1e-6)
        assert torch.equal(plain(0, h, ratio), got)  # a ratio given to a router without the flag is not read
        aware = Routers(replace(plain.cfg, mask_ratio=True))
        aware.load_state_dict({**plain.state_dict(), "routers.0.ratio_weight": torch.zeros(4)})
        assert torch.equal(aware(0, h, ratio), got)


def test_graph_replay_reads_each_forwards_ratio(ref_model):
    """One shape, masking ratios that change between forwards (as denoising goes): the runner's
    replayed router decisions equal the eager model's, so the static copy of the ratio follows."""
    torch.manual_seed(2)
    routers = Routers(RouterConfig(d_model=64, n_layers=6, hidden=16, init_bias=0.0, mask_ratio=True))
    with torch.no_grad():
        for r in routers.routers:
            r.ratio_weight.normal_(std=20.0)
    policy, runner = RoutedSkip(routers, 0.1), GraphRunner(ref_model)
    generator = torch.Generator().manual_seed(0)
    base = torch.randint(0, 240, (4, 12), generator=generator)
    order = torch.rand(4, 12, generator=generator).argsort(1)
    executed = []
    for masked in (10, 6, 2):  # fewer masked positions at each step
        ids = torch.where(order < masked, MASK_ID, base)
        with torch.no_grad():
            _, expected = ref_model(ids, policy=policy)
        _, got = runner(ids, policy=policy)
        assert torch.equal(got.executed, expected.executed), masked
        executed.append(expected.executed)
    assert not torch.equal(executed[0], executed[-1])  # the ratio changed decisions between forwards


def _identity(ref_dir):
    loaded = load_llada(str(ref_dir))
    return model_identity(loaded.model.cfg, str(ref_dir), loaded.fingerprint), loaded


def test_checkpoints_keep_the_ratio_term_and_old_ones_load_without_it(tmp_path, ref_dir):
    identity, loaded = _identity(ref_dir)
    torch.manual_seed(1)
    routers = Routers(RouterConfig(d_model=64, n_layers=6, hidden=16, init_bias=0.0, mask_ratio=True))
    with torch.no_grad():
        for r in routers.routers:
            r.ratio_weight.normal_(std=5.0)
    save_routers(tmp_path / "aware", routers, identity, {"lambda": 0.3})
    meta = json.loads((tmp_path / "aware" / "router.json").read_text())
    assert meta["router"]["mask_ratio"] is True
    back = load_routers(tmp_path / "aware", loaded.model.cfg, loaded.fingerprint).routers
    assert back.cfg.mask_ratio
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), routers.state_dict().values()))
    h, ratio = torch.randn(2, 7, 64), torch.tensor([0.25, 0.75])
    with torch.no_grad():
        assert torch.equal(back(3, h, ratio), routers(3, h, ratio))

    plain = Routers(RouterConfig(d_model=64, n_layers=6, hidden=16, init_bias=0.0))
    save_routers(tmp_path / "old", plain, identity, {"lambda": 0.3})
    meta_file = tmp_path / "old" / "router.json"
    meta = json.loads(meta_file.read_text())
    del meta["router"]["mask_ratio"]  # written before the field existed
    meta_file.write_text(json.dumps(meta))
    old = load_routers(tmp_path / "old", loaded.model.cfg, loaded.fingerprint).routers
    assert old.cfg.mask_ratio is False
    with torch.no_grad():
        assert torch.equal(old(3, h), plain(3, h))


def test_training_with_the_flag_learns_the_ratio_term_and_saves_it(ref_dir, tmp_path):
    """A few steps: w_r leaves zero (the ratio reaches the loss), router.json records the option,
    and the checkpoint loads as ratio-aware routers."""
    cfg = _config(ref_dir, tmp_path, "aware", lam=1.0, max_steps=4, eval_every=100, router_mask_ratio=True)
    metrics = train(cfg)
    assert 0 < metrics["val_execution_ratio"] <= 1
    meta = json.loads((tmp_path / "aware" / "router.json").read_text())
    assert meta["router"]["mask_ratio"] is True
    _, loaded = _identity(ref_dir)
    routers = load_routers(tmp_path / "aware", loaded.model.cfg, loaded.fingerprint).routers
    assert routers.cfg.mask_ratio
    assert all(r.ratio_weight.abs().sum() > 0 for r in routers.routers)


def test_router_flops_count_the_weight_matrices_and_not_the_ratio_vector():
    """FlopsModel counts 2 FLOPs per weight-matrix entry and position; the ratio term, like a bias,
    is one add per hidden unit and position (1 / (2 d) of the first layer): not counted, so a
    ratio-aware router of a width costs what a plain one does."""
    for depth in (2, 4):
        router = Routers(RouterConfig(d_model=64, n_layers=1, hidden=16, depth=depth, mask_ratio=True)).routers[0]
        matrices = sum(p.numel() for p in router.weights() if p.dim() == 2)
        model = FlopsModel(d_model=64, n_layers=1, kv_dim=64, mlp_hidden=128, vocab=100, router_hidden=16,
                           router_depth=depth)
        assert model.router(torch.tensor([10.0])).item() == 2 * 10 * matrices
    assert router.ratio_weight.dim() == 1
