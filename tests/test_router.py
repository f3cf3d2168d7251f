"""Routed skipping and the router trainer: decisions as the paper defines them, the objective,
training that moves the execution ratio, checkpoints that refuse the wrong model, exact resume."""

from __future__ import annotations

import json
import logging
import random
import sys

import pytest
import torch
from lm_eval.api.instance import Instance
from safetensors.torch import load_file

from lm_eval_dlmskip.data import encode_pairs, jsonl_texts, split_validation, task_texts
from lm_eval_dlmskip.harness.llada import LLaDASkipLM
from lm_eval_dlmskip.models.loading import load_llada, load_model
from lm_eval_dlmskip.skipping.identity import model_identity
from lm_eval_dlmskip.skipping.policies import ForwardBatch
from lm_eval_dlmskip.skipping.router_checkpoints import load_routers, save_routers
from lm_eval_dlmskip.skipping.routers import EXECUTE, SKIP, GumbelRouting, RoutedSkip, RouterConfig, Routers
from lm_eval_dlmskip.train.config import TrainConfig
from lm_eval_dlmskip.train.loop import lr_factor, train
from lm_eval_dlmskip.train.objective import collate

from .conftest import MASK_ID, words


def test_router_shapes_follow_d_llm_and_the_norm_first_option():
    default = Routers(RouterConfig(d_model=64, n_layers=2, hidden=16))
    names = [type(m).__name__ for m in default.routers[0].net]
    assert names == ["Linear", "RMSNorm", "SiLU", "Linear"]
    assert default.routers[0].net[0].in_features == 64 and default.routers[0].net[-1].out_features == 2
    first = Routers(RouterConfig(d_model=64, n_layers=2, hidden=16, norm_first=True))
    assert [type(m).__name__ for m in first.routers[0].net] == ["RMSNorm", "Linear", "SiLU", "Linear"]
    deep = Routers(RouterConfig(d_model=64, n_layers=2, hidden=16, depth=4))
    assert sum(type(m).__name__ == "Linear" for m in deep.routers[0].net) == 4


def test_router_width_defaults_to_an_eighth_of_d_model():
    """512 for LLaDA-8B (d_model 4096) as in the paper; on a small model the routers shrink with it."""
    assert RouterConfig(d_model=4096, n_layers=32).hidden == 512
    assert RouterConfig(d_model=256, n_layers=2).hidden == 32
    assert RouterConfig(d_model=4, n_layers=1).hidden == 1
    assert RouterConfig(d_model=256, n_layers=2, hidden=100).hidden == 100


def test_fresh_routers_run_every_block(ref_model, ref_tensors):
    routers = Routers(RouterConfig(d_model=64, n_layers=6, hidden=16))
    _, trace = ref_model(ref_tensors["forward.input_ids"], policy=RoutedSkip(routers, 0.1))
    assert trace.executed.all()
    assert trace.routed_layers == 6


def _voting_routers() -> Routers:
    """A 1-block router stack that votes skip where h[..., 0] > 0 and execute where it is < 0."""
    routers = Routers(RouterConfig(d_model=4, n_layers=1, hidden=4))
    first, last = routers.routers[0].net[0], routers.routers[0].net[-1]
    with torch.no_grad():
        first.weight.copy_(torch.eye(4))
        first.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))
        last.weight.copy_(torch.tensor([[10.0, 0, 0, 0], [0, 0, 0, 1.0]]))
        last.bias.zero_()
    return routers


def test_votes_are_counted_over_masked_positions_and_compared_with_tau():
    ids = torch.tensor([
        [2, MASK_ID, MASK_ID, MASK_ID, MASK_ID],  # 4 masked
        [1, MASK_ID, MASK_ID, 3, 5],  # 2 masked
        [1, 3, 5, 7, 9],  # none masked: runs every block
    ])
    votes = torch.tensor([[1, -1, 1, -1, -1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]])  # +1: skip vote
    h = torch.zeros(3, 5, 4)
    h[..., 0] = votes
    routers = _voting_routers()
    batch = ForwardBatch.of(ids, None, MASK_ID)
    # row 0: masked positions 1..4 vote skip once -> share 1/4; row 1: both masked positions skip -> 1
    assert RoutedSkip(routers, 0.1).rows_to_run(0, h, batch).tolist() == [False, False, True]
    assert RoutedSkip(routers, 0.25).rows_to_run(0, h, batch).tolist() == [True, False, True]  # 1/4 is not > 1/4
    assert RoutedSkip(routers, 0.99).rows_to_run(0, h, batch).tolist() == [True, False, True]
    padded = ForwardBatch.of(ids, torch.tensor([[1] * 5, [1] * 5, [0, 0, 1, 1, 1]]), MASK_ID)
    assert RoutedSkip(routers, 0.1).rows_to_run(0, h, padded).tolist() == [False, False, True]
    assert (SKIP, EXECUTE) == (0, 1)


def test_a_skip_share_equal_to_tau_runs_the_block():
    """The paper's rule is strict (skip when the share exceeds tau): at the default tau 0.1, one skip
    vote of 10 masked positions runs the block, one of 9 skips it."""
    ids = torch.full((3, 10), MASK_ID)
    ids[1, 9] = 7  # 9 masked positions
    h = -torch.ones(3, 10, 4)  # every position votes execute ...
    h[:, 0, 0] = 1.0  # ... but the first, which votes skip
    h[2, 0, 0] = -1.0  # row 2: no skip vote at all
    run = RoutedSkip(_voting_routers(), 0.1).rows_to_run(0, h, ForwardBatch.of(ids, None, MASK_ID))
    assert run.tolist() == [True, False, True]  # shares 1/10 (= tau), 1/9 (> tau), 0


def test_compiled_router_decides_as_the_eager_one():
    routers = _voting_routers()
    ids = torch.full((3, 5), MASK_ID)
    h = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    batch = ForwardBatch.of(ids, None, MASK_ID)
    for tau in (0.1, 0.5):
        eager = RoutedSkip(routers, tau).rows_to_run(0, h, batch)
        assert torch.equal(RoutedSkip(routers, tau).compiled().rows_to_run(0, h, batch), eager)


def test_gumbel_routing_is_hard_forward_and_differentiable():
    torch.manual_seed(0)
    routers = Routers(RouterConfig(d_model=8, n_layers=3, hidden=8, init_bias=0.0))
    ids = torch.full((4, 6), MASK_ID)
    routing = GumbelRouting(routers, temperature=1.0, generator=torch.Generator().manual_seed(1))
    h = torch.randn(4, 6, 8)
    gates = [routing.rows_to_run(layer, h, ForwardBatch.of(ids, None, MASK_ID)) for layer in range(3)]
    for gate in gates:
        assert set(gate.tolist()) <= {0.0, 1.0}
    routing.alpha().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in routers.routers[0].parameters())


def _pairs_file(tmp_path, n=48, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = [rng.randrange(240) for _ in range(rng.randint(3, 6))]
        target = [rng.randrange(240) for _ in range(rng.randint(2, 5))]
        rows.append({"prompt": words(prompt), "target": " " + words(target)})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(ref_dir, tmp_path, name, **kwargs) -> TrainConfig:
    base = dict(model=str(ref_dir), output=str(tmp_path / name), data=str(_pairs_file(tmp_path)), router_hidden=16,
                batch_size=8, effective_batch_size=16, lr=5e-3, warmup_steps=2, max_steps=40, eval_every=10,
                log_every=5, save_every=1000, dtype="float32", device="cpu", val_fraction=0.2)
    return TrainConfig(**{**base, **kwargs})


def _log(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("alpha_target", [0.5, 0.25])
def test_training_moves_the_execution_ratio_to_the_target_and_leaves_the_backbone(ref_dir, tmp_path, alpha_target, monkeypatch, caplog):
    """lambda = 5, 150 steps: the training execution ratio (mean of the last five logs) ends within
    0.1 of 1 - alpha_target, and the held-out ratio with inference decisions has left 1.0. The
    backbone the trainer holds in memory ends with the weights it started with."""
    import lm_eval_dlmskip.train.loop as train_module

    loaded = []

    def keep(*args, **kwargs):
        loaded.append(load_model(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(train_module, "load_model", keep)
    before = {k: v.clone() for k, v in load_llada(str(ref_dir)).model.state_dict().items()}
    cfg = _config(ref_dir, tmp_path, "lam5", lam=5.0, alpha_target=alpha_target, lr=1e-2, max_steps=150, eval_every=25)
    with caplog.at_level(logging.WARNING, logger="lm_eval_dlmskip.train"):
        metrics = train(cfg)
    assert "too short" not in caplog.text  # the routers moved: nothing to warn about
    log = _log(tmp_path / "lam5")
    val = [e["val_execution_ratio"] for e in log if "val_execution_ratio" in e]
    ratios = [e["execution_ratio"] for e in log if "execution_ratio" in e]
    assert val[0] == 1.0  # bias initialisation: every block runs before training
    assert abs(sum(ratios[-5:]) / 5 - (1 - alpha_target)) < 0.1, ratios
    assert metrics["val_execution_ratio"] < 0.95, val
    after = loaded[0].model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    meta = json.loads((tmp_path / "lam5" / "router.json").read_text())
    assert meta["lambda"] == 5.0 and meta["alpha_target"] == alpha_target and meta["mask_scaling"] is True
    assert meta["base_model"]["fingerprint"] == load_llada(str(ref_dir)).fingerprint
    assert meta["training"]["n_val"] > 0 and meta["metrics"]["val_execution_ratio"] == metrics["val_execution_ratio"]


def test_validation_measures_the_execution_ratio_evaluation_sees(ref_dir, tmp_path):
    """Training holds float32 routers; lm-eval runs them cast to the model's dtype. With near-tied
    votes (the two output rows almost equal) bfloat16 flips some of them: the recorded ratio must
    be the one RoutedSkip gives through the harness in bfloat16 on the same held-out forwards."""
    from lm_eval_dlmskip.models.loading import load_tokenizer
    from lm_eval_dlmskip.train.objective import validate, validation_batches

    torch.manual_seed(0)
    routers = Routers(RouterConfig(d_model=64, n_layers=6, hidden=16, init_bias=0.0, tau=0.5))
    with torch.no_grad():
        for r in routers.routers:
            last = r.net[-1]
            last.weight[SKIP] = last.weight[EXECUTE] + 1e-3 * torch.randn_like(last.weight[EXECUTE])
            last.bias.zero_()
    pairs = encode_pairs(jsonl_texts(_pairs_file(tmp_path)), load_tokenizer(ref_dir, MASK_ID), max_length=64)
    backbone = load_llada(str(ref_dir), dtype="bfloat16").model
    metrics = validate(backbone, routers, pairs, 8, 0, MASK_ID, 251)
    identity = model_identity(backbone.cfg, str(ref_dir), load_llada(str(ref_dir)).fingerprint)
    save_routers(tmp_path / "r", routers, identity, {"lambda": 0.3, "alpha_target": 0.5}, metrics)
    lm = LLaDASkipLM(pretrained=str(ref_dir), device="cpu", dtype="bfloat16", router=str(tmp_path / "r"))
    executed, rows = 0.0, 0
    with torch.no_grad():
        for batch, masked in validation_batches(pairs, 8, 0, 251):
            noisy = torch.where(masked, MASK_ID, batch.ids)
            _, trace = lm.model(noisy, batch.attention_mask, policy=lm.policy)
            executed += trace.executed.double().mean(1).sum().item()
            rows += len(noisy)
    assert 0 < executed / rows < 1
    assert metrics["val_execution_ratio"] == executed / rows and metrics["val_dtype"] == "bfloat16"
    assert json.loads((tmp_path / "r" / "router.json").read_text())["metrics"] == metrics


def test_without_the_skip_loss_every_block_keeps_running(ref_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lm_eval_dlmskip.train"):
        metrics = train(_config(ref_dir, tmp_path, "lam0", lam=0.0, lr=1e-2, max_steps=60))
    ratios = [e["execution_ratio"] for e in _log(tmp_path / "lam0") if "execution_ratio" in e]
    assert metrics["val_execution_ratio"] > 0.9 and min(ratios) > 0.85, ratios
    assert "too short" not in caplog.text  # nothing asked the routers to skip


def test_a_run_too_short_to_move_the_routers_says_what_to_change(ref_dir, tmp_path, caplog):
    """The default lr (the paper's, for 8B) on a tiny model: the held-out ratio stays at 1.0. With
    the default 2-epoch warmup, 4 steps are all warmup, which the warning says too."""
    with caplog.at_level(logging.WARNING, logger="lm_eval_dlmskip.train"):
        train(_config(ref_dir, tmp_path, "low-lr", lam=1.0, lr=5e-5, warmup_steps=1, max_steps=6, eval_every=3))
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "too short to move the routers: the held-out execution ratio is 1.000 after 6 steps" in warning
    assert "warmup (" not in warning
    assert all(flag in warning for flag in ("Raise --lr", "--max-steps, now 6", "--warmup-steps, now 1", "docs/demo/README.md"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lm_eval_dlmskip.train"):
        train(_config(ref_dir, tmp_path, "in-warmup", lam=1.0, lr=5e-5, warmup_steps=None, max_steps=4, eval_every=2))
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "all 4 steps were warmup (4 steps), so the learning rate never reached --lr 5e-05" in warning


def test_lora_adapters_train_with_the_routers_and_are_merged_at_evaluation(ref_dir, tmp_path):
    from lm_eval_dlmskip.models.loading import merge_lora

    train(_config(ref_dir, tmp_path, "lora", lam=1.0, lr=1e-2, max_steps=4, lora=True, lora_rank=2, router_hidden=None))
    ckpt = tmp_path / "lora"
    meta = json.loads((ckpt / "router.json").read_text())
    assert meta["lora"] is True and meta["router"]["hidden"] == 64 // 8  # the default width, d_model / 8
    assert (ckpt / "adapter" / "adapter_model.safetensors").exists()
    lm = LLaDASkipLM(pretrained=str(ref_dir), device="cpu", router=str(ckpt))
    expected = merge_lora(load_llada(str(ref_dir)).model, str(ckpt / "adapter"))
    ids = torch.randint(0, 240, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(lm.model(ids)[0], expected(ids)[0], atol=1e-5)
        assert (lm.model(ids)[0] - load_llada(str(ref_dir)).model(ids)[0]).abs().max() > 1e-3


def test_backbone_gets_no_gradient(ref_dir, ref_model):
    from lm_eval_dlmskip.train.objective import RouterObjective

    backbone = load_llada(str(ref_dir)).model.requires_grad_(False)
    routers = Routers(RouterConfig(d_model=64, n_layers=6, hidden=16))
    objective = RouterObjective(backbone, routers, TrainConfig(model="m", output="o", data="d", lam=0.5), MASK_ID)
    batch = collate([type("P", (), {"prompt": [1, 2, 3], "target": [4, 5, 6, 7]})()] * 2, 251)
    loss, _ = objective(batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert any(p.grad is not None for p in routers.parameters())


def test_training_keeps_the_fused_projections(ref_dir):
    """Preparing the objective as training does (accelerate moves it to its device) and casting
    the model keep one q/k/v and one gate/up product per block, with the same numbers."""
    from accelerate import Accelerator

    from lm_eval_dlmskip.train.objective import RouterObjective

    backbone = load_llada(str(ref_dir)).model.requires_grad_(False)
    routers = Routers(RouterConfig(d_model=64, n_layers=6, hidden=16))
    Accelerator(cpu=True).prepare(RouterObjective(backbone, routers, TrainConfig(model="m", output="o", data="d"), MASK_ID))
    assert all(block.fused_weights() is not None for block in backbone.blocks)
    cast = load_llada(str(ref_dir)).model.to(torch.bfloat16)
    assert all(block.fused_weights() is not None for block in cast.blocks)
    ids = torch.randint(0, 240, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(cast(ids)[0], load_llada(str(ref_dir), dtype="bfloat16").model(ids)[0])


def test_a_training_step_reads_nothing_back_per_micro_batch(ref_dir, tmp_path, monkeypatch):
    """A run of one optimizer step of 1 and one of 4 micro-batches read the same number of values
    back to the host (.item(), .tolist()): the statistics stay on the device until a logging step."""
    counts = []
    for accumulation in (1, 4):
        calls = []
        for method in ("item", "tolist"):
            real = getattr(torch.Tensor, method)
            monkeypatch.setattr(torch.Tensor, method, lambda self, *a, _real=real: calls.append(1) or _real(self, *a))
        train(_config(ref_dir, tmp_path, f"sync{accumulation}", batch_size=4, effective_batch_size=4 * accumulation,
                      max_steps=1, log_every=1))
        monkeypatch.undo()
        counts.append(len(calls))
    assert counts[0] == counts[1], counts


def test_micro_batch_is_the_largest_divisor_that_fits(monkeypatch):
    """Without --batch-size: on a GPU the largest micro-batch that divides the examples per step and
    fits in memory (accelerate's find_executable_batch_size); on a CPU at most 4."""
    from lm_eval_dlmskip.train.loop import choose_micro_batch

    tried = []

    def fits(size):
        tried.append(size)
        if size > 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")

    assert choose_micro_batch(fits, per_process=24, cuda=True) == 4
    assert tried == [24, 12, 8, 6, 4]  # divisors of 24, largest first
    assert choose_micro_batch(fits, per_process=24, cuda=False) == 4 and len(tried) == 5  # no probe on a CPU
    assert choose_micro_batch(fits, per_process=6, cuda=False) == 3
    with pytest.raises(ValueError, match="not even 1 example .* fits in GPU memory; lower --max-length"):
        choose_micro_batch(lambda size: fits(size + 10), per_process=8, cuda=True)


def test_objective_is_the_papers_formula(ref_dir):
    """With routers that always execute, alpha = 0 and the loss is (CE + lambda * alpha_target) / p."""
    from lm_eval_dlmskip.train.objective import RouterObjective

    backbone = load_llada(str(ref_dir)).model.requires_grad_(False)
    routers = Routers(RouterConfig(d_model=64, n_layers=6, hidden=16, init_bias=1e4))
    pairs = [type("P", (), {"prompt": [1, 2, 3], "target": [4, 5, 6, 7, 8]})(), type("P", (), {"prompt": [9], "target": [10, 11]})()]
    batch = collate(pairs, 251)
    for scaling in (True, False):
        cfg = TrainConfig(model="m", output="o", data="d", lam=0.7, alpha_target=0.4, mask_scaling=scaling)
        loss, stats = RouterObjective(backbone, routers, cfg, MASK_ID)(batch, torch.Generator().manual_seed(3))
        # Redraw the same masks from the same generator sequence and score without routers.
        g = torch.Generator().manual_seed(3)
        p = (1 - cfg.min_mask_ratio) * torch.rand(2, 1, generator=g) + cfg.min_mask_ratio
        masked = batch.target & (torch.rand(batch.ids.shape, generator=g) < p)
        logits, _ = backbone(torch.where(masked, MASK_ID, batch.ids), batch.attention_mask)
        ce = torch.nn.functional.cross_entropy(logits[masked], batch.ids[masked], reduction="none")
        row = masked.nonzero()[:, 0]
        ce_row = torch.zeros(2).index_add_(0, row, ce) / batch.target_len
        expected = (ce_row + 0.7 * 0.4) / p[:, 0] if scaling else ce_row / p[:, 0] + 0.7 * 0.4
        assert stats["alpha"] == 0
        assert loss.item() == pytest.approx(expected.mean().item(), rel=1e-5)


def test_resume_gives_the_same_routers_as_one_run(ref_dir, tmp_path, monkeypatch):
    import lm_eval_dlmskip.train.loop as train_module

    train(_config(ref_dir, tmp_path, "straight", lam=1.0, max_steps=12, eval_every=100))
    # The same run, killed during step 8 after saving at step 6, then resumed.
    real = train_module.step_examples

    def dies_at_step_8(pairs, step, per_step, seed):
        if step == 7:
            raise KeyboardInterrupt("killed")
        return real(pairs, step, per_step, seed)

    interrupted = _config(ref_dir, tmp_path, "resumed", lam=1.0, max_steps=12, eval_every=100, save_every=6)
    monkeypatch.setattr(train_module, "step_examples", dies_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted)
    monkeypatch.setattr(train_module, "step_examples", real)
    assert json.loads((tmp_path / "resumed" / "train_state.json").read_text())["step"] == 6
    with pytest.raises(ValueError, match="is not empty; pass --resume"):
        train(interrupted)
    train(TrainConfig(**{**interrupted.__dict__, "resume": True}))
    a = load_file(str(tmp_path / "straight" / "router.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "router.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [e["step"] for e in _log(tmp_path / "resumed") if "loss" in e]
    assert steps == [5, 10, 12]  # the log continues where the saved state left it
    with pytest.raises(ValueError, match="other settings \\(lam\\)"):
        train(TrainConfig(**{**interrupted.__dict__, "resume": True, "lam": 0.5}))


def test_lr_schedule_warms_up_then_half_cosine():
    assert [round(lr_factor(s, 4, 12), 3) for s in (0, 3, 4, 8, 12)] == [0.25, 1.0, 1.0, 0.5, 0.0]


def _saved_routers(tmp_path, ref_dir, **settings):
    torch.manual_seed(4)
    routers = Routers(RouterConfig(d_model=64, n_layers=6, hidden=16, init_bias=0.0))
    for r in routers.routers:
        torch.nn.init.normal_(r.net[-1].weight, std=3.0)  # decisions that differ by row and block
    identity = model_identity(load_llada(str(ref_dir)).model.cfg, str(ref_dir), load_llada(str(ref_dir)).fingerprint)
    path = tmp_path / "router"
    save_routers(path, routers, identity, {"lambda": 0.3, "alpha_target": 0.5, "mask_scaling": True, **settings})
    return routers, path


def test_saved_routers_decide_exactly_as_in_memory(tmp_path, ref_dir, ref, ref_model):
    routers, path = _saved_routers(tmp_path, ref_dir)
    ids = torch.randint(0, 240, (6, 14), generator=torch.Generator().manual_seed(0))
    ids[torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.5] = MASK_ID
    _, expected = ref_model(ids, policy=RoutedSkip(routers, 0.1))
    assert 0 < expected.executed.float().mean() < 1  # a non-trivial mix of decisions
    lm = LLaDASkipLM(pretrained=str(ref_dir), device="cpu", router=str(path), mc_num=16)
    _, loaded = lm.model(ids, policy=lm.policy)
    assert torch.equal(loaded.executed, expected.executed)
    # Through the harness: the FLOPs it records equal the trace of the in-memory routers.
    requests = [Instance("loglikelihood", {}, (words(r["prompt"]), " " + words(r["answer"])), i, ("t", i, 1))
                for i, r in enumerate(ref["cases"]["loglikelihood"]["runs"][:3])]
    lm.loglikelihood(requests)
    info = lm.get_model_info()["dlmskip"]
    assert info["skip"]["method"] == "routed" and info["skip"]["lambda"] == 0.3
    memory = LLaDASkipLM(pretrained=str(ref_dir), device="cpu", mc_num=16)
    memory.policy = RoutedSkip(routers, 0.1)
    memory.meter.flops = lm.meter.flops
    memory.loglikelihood(requests)
    assert memory.get_model_info()["dlmskip"]["flops"] == info["flops"]
    buckets = info["flops"]["t"]["by_masked_fraction"]
    assert sum(b["forwards"] for b in buckets) == info["flops"]["t"]["forwards"]


def test_routers_that_cost_more_than_they_save_are_warned_about(tmp_path, ref_dir, ref, caplog):
    """Routers as wide as the model that never skip: the whole-model FLOPs exceed 1.0, and the
    harness says so; a static skip set is never warned about."""
    routers = Routers(RouterConfig(d_model=64, n_layers=6, hidden=64, init_bias=1e4))
    identity = model_identity(load_llada(str(ref_dir)).model.cfg, str(ref_dir), load_llada(str(ref_dir)).fingerprint)
    save_routers(tmp_path / "wide", routers, identity, {"lambda": 0.3, "alpha_target": 0.5})
    requests = [Instance("loglikelihood", {}, (words(r["prompt"]), " " + words(r["answer"])), i, ("t", i, 1))
                for i, r in enumerate(ref["cases"]["loglikelihood"]["runs"][:2])]
    for model_args, warned in ((dict(router=str(tmp_path / "wide")), True), (dict(skip_layers=[1]), False)):
        lm = LLaDASkipLM(pretrained=str(ref_dir), device="cpu", mc_num=2, **model_args)
        caplog.clear()
        with caplog.at_level("WARNING", logger="lm_eval.llada_skip"):
            lm.loglikelihood(requests)
        assert lm.get_model_info()["dlmskip"]["flops"]["t"]["normalized_flops_whole_model"] > 1.0 or not warned
        messages = [r.getMessage() for r in caplog.records if "cost more" in r.getMessage()]
        assert len(messages) == warned and (not warned or "[t]" in messages[0] and "--router-hidden" in messages[0]), messages


def test_router_tau_overrides_the_checkpoint(tmp_path, ref_dir):
    _, path = _saved_routers(tmp_path, ref_dir)
    lm = LLaDASkipLM(pretrained=str(ref_dir), device="cpu", router=str(path), router_tau=0.9)
    assert lm.policy.tau == 0.9 and lm.get_model_info()["dlmskip"]["skip"]["tau"] == 0.9


def test_checkpoint_for_another_model_is_refused(tmp_path, ref_dir):
    from lm_eval_dlmskip.demo import write_checkpoint

    _, path = _saved_routers(tmp_path, ref_dir)
    cfg = load_llada(str(ref_dir)).model.cfg
    with pytest.raises(ValueError, match=r"was trained for .*n_layers=6, d_model=64.*this model has n_layers=8"):
        load_routers(path, type(cfg)(**{**cfg.to_dict(), "n_layers": 8}), "abc")
    with pytest.raises(ValueError, match=r"fingerprint .*allow_mismatch=True"):
        load_routers(path, cfg, "0000000000000000")
    assert load_routers(path, cfg, "0000000000000000", allow_mismatch=True).routers.cfg.n_layers == 6
    # Through the harness: another checkpoint with the same shapes but other weights.
    other = load_llada(str(ref_dir)).model
    with torch.no_grad():
        other.blocks[0].q_proj.weight.add_(1.0)
    write_checkpoint(tmp_path / "other", json.loads((ref_dir / "config.json").read_text()), other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "other" / name).write_text((ref_dir / name).read_text())
    with pytest.raises(ValueError, match="was trained for"):
        LLaDASkipLM(pretrained=str(tmp_path / "other"), device="cpu", router=str(path))
    LLaDASkipLM(pretrained=str(tmp_path / "other"), device="cpu", router=str(path), allow_mismatch=True)


def _lora_adapter(tmp_path, ref_dir, seed: int = 0):
    """A tiny LoRA adapter (nonzero, so it changes the weights), saved as peft saves it; and its model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(load_llada(str(ref_dir)).model, config)
    model.save_pretrained(str(tmp_path / f"adapter{seed}"))
    return tmp_path / f"adapter{seed}", model


def test_routers_and_profiles_are_checked_against_the_weights_evaluated(tmp_path, ref_dir):
    """Made on the base weights, a router or a skip profile does not fit base + a peft adapter: the
    identity checked is that of the weights after merging the adapter."""
    from lm_eval_dlmskip.report import calibrate

    _, router = _saved_routers(tmp_path, ref_dir)
    adapter, _ = _lora_adapter(tmp_path, ref_dir)
    base = load_llada(str(ref_dir))
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"kind": calibrate.KIND, "format": calibrate.FORMAT_VERSION, "threshold": 0.9,
                                   "selection_order": [2], "base_model": model_identity(base.model.cfg, str(ref_dir), base.fingerprint)}))
    fp = base.fingerprint
    evaluated = rf"the weights evaluated \(base {fp} \+ peft adapter [0-9a-f]{{16}}\) have fingerprint {fp}\+[0-9a-f]{{16}}"
    for artifact in ({"router": str(router)}, {"skip_profile": str(profile)}):
        with pytest.raises(ValueError, match=rf"(trained for|measured on) .*fingerprint {base.fingerprint}\); {evaluated}"):
            LLaDASkipLM(pretrained=str(ref_dir), device="cpu", peft=str(adapter), **artifact)
        LLaDASkipLM(pretrained=str(ref_dir), device="cpu", **artifact)  # the base weights: accepted
        LLaDASkipLM(pretrained=str(ref_dir), device="cpu", peft=str(adapter), allow_mismatch=True, **artifact)
    with_adapter = LLaDASkipLM(pretrained=str(ref_dir), device="cpu", peft=str(adapter)).get_model_info()["dlmskip"]
    other, _ = _lora_adapter(tmp_path, ref_dir, seed=1)
    assert with_adapter["fingerprint"].startswith(base.fingerprint + "+")
    assert LLaDASkipLM(pretrained=str(ref_dir), device="cpu", peft=str(other)).get_model_info()["dlmskip"]["fingerprint"] not in (
        with_adapter["fingerprint"], base.fingerprint)


def test_a_router_with_its_own_adapter_is_checked_before_merging_it(tmp_path, ref_dir):
    """A router trained with LoRA records the base it was trained on; its adapter is merged after
    the check, so it loads on that base, and is refused on base + another peft adapter."""
    routers, _ = _saved_routers(tmp_path, ref_dir)
    _, lora_model = _lora_adapter(tmp_path, ref_dir)
    base = load_llada(str(ref_dir))
    path = tmp_path / "lora-router"
    save_routers(path, routers, model_identity(base.model.cfg, str(ref_dir), base.fingerprint),
                 {"lambda": 0.3, "alpha_target": 0.5, "mask_scaling": True}, lora_model=lora_model)
    lm = LLaDASkipLM(pretrained=str(ref_dir), device="cpu", router=str(path))
    ids = torch.randint(0, 240, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(lm.model(ids)[0], lora_model(ids)[0], atol=1e-4)
    adapter, _ = _lora_adapter(tmp_path, ref_dir, seed=1)
    with pytest.raises(ValueError, match=r"was trained for .*the weights evaluated \(base [0-9a-f]{16} \+ peft adapter"):
        LLaDASkipLM(pretrained=str(ref_dir), device="cpu", router=str(path), peft=str(adapter))


def test_damaged_checkpoints_are_refused_cleanly(tmp_path, ref_dir):
    _, path = _saved_routers(tmp_path, ref_dir)
    cfg, fingerprint = load_llada(str(ref_dir)).model.cfg, load_llada(str(ref_dir)).fingerprint
    weights = path / "router.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="router.safetensors: not a readable safetensors file"):
        load_routers(path, cfg, fingerprint)
    weights.write_bytes(data)
    (path / "router.json").write_text("{ not json")
    with pytest.raises(ValueError, match="router.json: not valid JSON"):
        load_routers(path, cfg, fingerprint)
    (path / "router.json").unlink()
    with pytest.raises(ValueError, match="router.json is missing"):
        load_routers(path, cfg, fingerprint)
    with pytest.raises(ValueError, match="no such checkpoint directory"):
        load_routers(tmp_path / "nowhere", cfg, fingerprint)


def test_router_conflicts_with_static_skipping(tmp_path, ref_dir):
    _, path = _saved_routers(tmp_path, ref_dir)
    with pytest.raises(ValueError, match="skip_layers and router both given"):
        LLaDASkipLM(pretrained=str(ref_dir), device="cpu", router=str(path), skip_layers=[1])
    with pytest.raises(ValueError, match="router_tau is given without router"):
        LLaDASkipLM(pretrained=str(ref_dir), device="cpu", router_tau=0.2)


def test_atomic_save_keeps_the_old_checkpoint_when_writing_fails(tmp_path, ref_dir):
    routers, path = _saved_routers(tmp_path, ref_dir)
    before = (path / "router.safetensors").read_bytes()

    def explode(tmp):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_routers(path, routers, {"name": "x"}, {}, extra=explode)
    assert (path / "router.safetensors").read_bytes() == before
    assert json.loads((path / "router.json").read_text())["lambda"] == 0.3


def test_task_pairs_use_the_tasks_own_prompt_format(tmp_path):
    from lm_eval_dlmskip.demo import write_tasks

    tasks = write_tasks(tmp_path)
    mc, note = task_texts("demo_reverse_mc", str(tasks))
    gen, _ = task_texts("demo_reverse_gen", str(tasks))
    assert note == "demo_reverse_mc:train[200]"
    docs = [json.loads(line) for line in (tasks / "reverse_train.jsonl").read_text().splitlines()]
    assert mc[0] == (docs[0]["prompt"], docs[0]["choices"][docs[0]["label"]])  # delimiter "" in this task
    assert gen[0] == (docs[0]["prompt"], " " + docs[0]["answer"])
    with pytest.raises(ValueError, match="not an lm-eval task here"):
        task_texts("no_such_task", str(tasks))


def _fewshot_task(root, output_type: str, sampler: str):
    """A task with a description and 2 shots from its training split; its test split holds the
    same documents, so each training document also has an evaluation request."""
    docs = [{"q": f"t{i} t{i + 1}", "choices": [f" t{i + 2}", f" t{i + 3}"], "label": i % 2, "answer": f"t{i + 2}"} for i in range(8)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    body = ('output_type: multiple_choice\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n'
            if output_type == "multiple_choice" else
            'output_type: generate_until\ndoc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: [t248]\n'
            "metric_list:\n  - metric: exact_match\n")
    (root / "fewshot.yaml").write_text(
        f"task: fewshot\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    train: {root / 'docs.jsonl'}\n"
        f"    test: {root / 'docs.jsonl'}\ntraining_split: train\ntest_split: test\nfewshot_split: train\n"
        f"fewshot_config:\n  sampler: {sampler}\nnum_fewshot: 2\ndescription: \"Continue the count.\\n\\n\"\n"
        f'doc_to_text: "Q: {{{{q}}}}\\nA:"\n' + body
    )
    return docs


@pytest.mark.parametrize("output_type", ["multiple_choice", "generate_until"])
@pytest.mark.parametrize("chat", [False, True])
def test_task_prompts_are_the_evaluation_requests_with_their_shots(tmp_path, output_type, chat):
    """With the task's own num_fewshot (2), description and (optionally) a chat template, a training
    prompt is the context lm-eval builds for the same document's evaluation request (and a
    multiple-choice target its gold continuation). The first-n sampler shows documents 0 and 1 to
    every evaluation request; training leaves a document out of its own shots."""
    from lm_eval.tasks import TaskManager

    docs = _fewshot_task(tmp_path, output_type, "first_n")

    def template(messages, add_generation_prompt=True):
        return "|".join(f"<{m['role']}>{m['content']}" for m in messages) + ("|<assistant>" if add_generation_prompt else "")

    texts, note = task_texts("fewshot", str(tmp_path), chat_template=template if chat else None, fewshot_as_multiturn=chat, num_fewshot=None)
    assert note == "fewshot:train[8] 2-shot"
    task = TaskManager(include_path=str(tmp_path), include_defaults=False).load("fewshot")["tasks"]["fewshot"]
    task.set_fewshot_seed(1234)
    task.build_all_requests(apply_chat_template=chat, fewshot_as_multiturn=chat, chat_template=template if chat else None)
    for i, doc in enumerate(docs):
        [request] = [r for r in task.instances if r.doc_id == i and (output_type != "multiple_choice" or r.idx == doc["label"])]
        prompt, target = texts[i]
        assert prompt.startswith("<system>Continue the count." if chat else "Continue the count.\n\nQ: ")
        assert prompt.count(f"Q: {doc['q']}\nA:") == 1  # never its own shot
        if i >= 2:  # documents 0 and 1 are the shots of the evaluation requests
            assert prompt == request.args[0]
        if output_type == "multiple_choice":
            assert target == request.args[1] and target.strip() == doc["choices"][doc["label"]].strip()
        else:
            assert target == (doc["answer"] if chat else " " + doc["answer"])


def test_random_shots_never_show_the_document_itself(tmp_path):
    """lm-eval's default sampler leaves a document out only when the few-shot split is the test
    split; training draws its shots from the very split it trains on."""
    docs = _fewshot_task(tmp_path, "generate_until", "default")
    texts, _ = task_texts("fewshot", str(tmp_path), num_fewshot=3, seed=0)
    for doc, (prompt, _) in zip(docs, texts):
        assert prompt.count(f"Q: {doc['q']}\nA:") == 1 and prompt.count("Q: ") == 4


def test_train_takes_the_tasks_shots_and_lm_evals_prompt_flags(ref_dir, tmp_path):
    from lm_eval_dlmskip.data import tokenizer_chat_template
    from lm_eval_dlmskip.models.loading import load_tokenizer

    _fewshot_task(tmp_path / "tasks", "generate_until", "first_n")
    cfg = _config(ref_dir, tmp_path, "fs", data=None, task="fewshot", include_path=str(tmp_path / "tasks"),
                  batch_size=2, effective_batch_size=2, max_steps=1)
    train(cfg)
    training = json.loads((tmp_path / "fs" / "router.json").read_text())["training"]
    assert training["source"] == "task fewshot: fewshot:train[8] 2-shot" and training["num_fewshot"] is None
    with pytest.raises(ValueError, match="--fewshot-as-multiturn needs --apply-chat-template"):
        TrainConfig(**{**cfg.__dict__, "fewshot_as_multiturn": True}).check()
    with pytest.raises(ValueError, match="--data prompts are used as written"):
        TrainConfig(**{**cfg.__dict__, "task": None, "data": "d.jsonl", "num_fewshot": 5}).check()
    with pytest.raises(ValueError, match="tokenizer has no chat template"):
        tokenizer_chat_template(load_tokenizer(ref_dir, MASK_ID))


def test_jsonl_pairs_and_validation_split(tmp_path, ref_dir):
    from lm_eval_dlmskip.models.loading import load_tokenizer

    texts = jsonl_texts(_pairs_file(tmp_path, n=10))
    pairs = encode_pairs(texts, load_tokenizer(ref_dir, MASK_ID), max_length=64)
    assert len(pairs) == 10 and all(p.target for p in pairs)
    train_part, val = split_validation(pairs, 0.2, seed=0)
    assert len(val) == 2 and len(train_part) == 8
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "t1"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: each line needs"):
        jsonl_texts(bad)


def _cli_train_args(ref_dir, tmp_path, name: str, *extra: str) -> list[str]:
    return ["train", "--model", str(ref_dir), "--data", str(_pairs_file(tmp_path)), "--output", str(tmp_path / name),
            "--router-hidden", "16", "--batch-size", "8", "--effective-batch-size", "16", "--warmup-steps", "2",
            "--dtype", "float32", "--device", "cpu", "--eval-every", "100", *extra]


def test_train_says_where_the_router_went_and_how_lm_eval_uses_it(ref_dir, tmp_path, capsys):
    from lm_eval_dlmskip.cli import main

    assert main(_cli_train_args(ref_dir, tmp_path, "r", "--max-steps", "2")) == 0
    out = capsys.readouterr().out
    router = (tmp_path / "r").resolve()
    assert f"router checkpoint: {router}" in out
    assert f"lm_eval --model llada_skip --model_args 'pretrained={ref_dir.resolve()},router={router}'" in out


def test_the_printed_lm_eval_command_evaluates_on_what_the_routers_were_trained_on(tmp_path, monkeypatch):
    """The task, its folder (absolute), the few-shot count and the chat template of training, as
    lm_eval's own command line reads them (lm_eval turns multi-turn few-shot on with the template,
    so a run trained without it says false); routers trained on --data leave TASKS to the user."""
    import shlex

    from lm_eval._cli import HarnessCLI

    from lm_eval_dlmskip.train.cli import evaluation_command

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    cfg = TrainConfig(model="ckpt", output="routers/r1", task="gsm8k_llada", include_path="tasks", num_fewshot=5,
                      apply_chat_template=True)
    command = evaluation_command(cfg, "llada")
    assert command == (f"lm_eval --model llada_skip --model_args 'pretrained={tmp_path}/ckpt,router={tmp_path}/routers/r1' "
                       f"--tasks gsm8k_llada --include_path {tmp_path}/tasks --num_fewshot 5 --apply_chat_template "
                       "--fewshot_as_multiturn false")
    monkeypatch.setattr(sys, "argv", shlex.split(command))
    args = HarnessCLI().parse_args()
    assert args.model_args == {"pretrained": f"{tmp_path}/ckpt", "router": f"{tmp_path}/routers/r1"}
    assert (args.tasks, args.include_path, args.num_fewshot) == (["gsm8k_llada"], f"{tmp_path}/tasks", 5)
    assert (args.apply_chat_template, args.fewshot_as_multiturn) == (True, False)
    data = TrainConfig(model="GSAI-ML/LLaDA-8B-Base", output="r2", data="pairs.jsonl")
    assert evaluation_command(data, "dream") == (f"lm_eval --model dream_skip --model_args "
                                                 f"'pretrained=GSAI-ML/LLaDA-8B-Base,router={tmp_path}/r2' --tasks TASKS")


def test_ctrl_c_during_train_names_the_checkpoint_and_the_resume_command(ref_dir, tmp_path, monkeypatch, capsys):
    import shlex

    import lm_eval_dlmskip.train.loop as train_module
    from lm_eval_dlmskip.cli import main

    real = train_module.step_examples

    def dies_at_step(stop):
        def step_examples(pairs, step, per_step, seed):
            if step == stop:
                raise KeyboardInterrupt
            return real(pairs, step, per_step, seed)
        return step_examples

    monkeypatch.setattr(train_module, "step_examples", dies_at_step(1))
    args = _cli_train_args(ref_dir, tmp_path, "early", "--max-steps", "6", "--save-every", "3")
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "interrupted before the first checkpoint" in err and "Traceback" not in err
    assert f"Start it again from step 0 with:\n  dlmskip {shlex.join(args)} --resume" in err

    monkeypatch.setattr(train_module, "step_examples", dies_at_step(4))
    args = _cli_train_args(ref_dir, tmp_path, "late", "--max-steps", "6", "--save-every", "3")
    assert main(args) == 130
    err = capsys.readouterr().err
    assert f"the last checkpoint ({(tmp_path / 'late').resolve()}) holds step 3" in err
    resume = f"dlmskip {shlex.join(args)} --resume"
    assert resume in err
    monkeypatch.setattr(train_module, "step_examples", real)
    assert main(shlex.split(resume)[1:]) == 0
