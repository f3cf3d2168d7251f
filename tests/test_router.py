"""Routed skipping and the router trainer: decisions as the paper defines them, the objective,
training that moves the execution ratio, checkpoints that refuse the wrong model, exact resume."""

from __future__ import annotations

import json
import random

import pytest
import torch
from lm_eval.api.instance import Instance
from safetensors.torch import load_file

from lm_eval_dlmskip.harness import LLaDASkipLM
from lm_eval_dlmskip.loading import load_llada, model_identity
from lm_eval_dlmskip.policies import ForwardBatch
from lm_eval_dlmskip.router import (
    EXECUTE,
    SKIP,
    GumbelRouting,
    RoutedSkip,
    RouterConfig,
    Routers,
    load_routers,
    save_routers,
)
from lm_eval_dlmskip.train import TrainConfig, collate, lr_factor, train
from lm_eval_dlmskip.train_data import encode_pairs, jsonl_texts, split_validation, task_texts

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
def test_training_moves_the_execution_ratio_to_the_target_and_leaves_the_backbone(ref_dir, tmp_path, alpha_target):
    """lambda = 5, 150 steps: the training execution ratio (mean of the last five logs) ends within
    0.1 of 1 - alpha_target, and the held-out ratio with inference decisions has left 1.0."""
    before = {k: v.clone() for k, v in load_llada(str(ref_dir)).model.state_dict().items()}
    cfg = _config(ref_dir, tmp_path, "lam5", lam=5.0, alpha_target=alpha_target, lr=1e-2, max_steps=150, eval_every=25)
    metrics = train(cfg)
    log = _log(tmp_path / "lam5")
    val = [e["val_execution_ratio"] for e in log if "val_execution_ratio" in e]
    ratios = [e["execution_ratio"] for e in log if "execution_ratio" in e]
    assert val[0] == 1.0  # bias initialisation: every block runs before training
    assert abs(sum(ratios[-5:]) / 5 - (1 - alpha_target)) < 0.1, ratios
    assert metrics["val_execution_ratio"] < 0.95, val
    after = load_llada(str(ref_dir)).model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    meta = json.loads((tmp_path / "lam5" / "router.json").read_text())
    assert meta["lambda"] == 5.0 and meta["alpha_target"] == alpha_target and meta["mask_scaling"] is True
    assert meta["base_model"]["fingerprint"] == load_llada(str(ref_dir)).fingerprint
    assert meta["training"]["n_val"] > 0 and meta["metrics"]["val_execution_ratio"] == metrics["val_execution_ratio"]


def test_without_the_skip_loss_every_block_keeps_running(ref_dir, tmp_path):
    metrics = train(_config(ref_dir, tmp_path, "lam0", lam=0.0, lr=1e-2, max_steps=60))
    ratios = [e["execution_ratio"] for e in _log(tmp_path / "lam0") if "execution_ratio" in e]
    assert metrics["val_execution_ratio"] > 0.9 and min(ratios) > 0.85, ratios


def test_lora_adapters_train_with_the_routers_and_are_merged_at_evaluation(ref_dir, tmp_path):
    from lm_eval_dlmskip.loading import merge_lora

    train(_config(ref_dir, tmp_path, "lora", lam=1.0, lr=1e-2, max_steps=4, lora=True, lora_rank=2))
    ckpt = tmp_path / "lora"
    assert json.loads((ckpt / "router.json").read_text())["lora"] is True
    assert (ckpt / "adapter" / "adapter_model.safetensors").exists()
    lm = LLaDASkipLM(pretrained=str(ref_dir), device="cpu", router=str(ckpt))
    expected = merge_lora(load_llada(str(ref_dir)).model, str(ckpt / "adapter"))
    ids = torch.randint(0, 240, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(lm.model(ids)[0], expected(ids)[0], atol=1e-5)
        assert (lm.model(ids)[0] - load_llada(str(ref_dir)).model(ids)[0]).abs().max() > 1e-3


def test_backbone_gets_no_gradient(ref_dir, ref_model):
    from lm_eval_dlmskip.train import RouterObjective

    backbone = load_llada(str(ref_dir)).model.requires_grad_(False)
    routers = Routers(RouterConfig(d_model=64, n_layers=6, hidden=16))
    objective = RouterObjective(backbone, routers, TrainConfig(model="m", output="o", data="d", lam=0.5), MASK_ID)
    batch = collate([type("P", (), {"prompt": [1, 2, 3], "target": [4, 5, 6, 7]})()] * 2, 251)
    loss, _ = objective(batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert any(p.grad is not None for p in routers.parameters())


def test_objective_is_the_papers_formula(ref_dir):
    """With routers that always execute, alpha = 0 and the loss is (CE + lambda * alpha_target) / p."""
    from lm_eval_dlmskip.train import RouterObjective

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
    import lm_eval_dlmskip.train as train_module

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


def test_jsonl_pairs_and_validation_split(tmp_path, ref_dir):
    from lm_eval_dlmskip.loading import load_tokenizer

    texts = jsonl_texts(_pairs_file(tmp_path, n=10))
    pairs = encode_pairs(texts, load_tokenizer(ref_dir, MASK_ID), max_length=64)
    assert len(pairs) == 10 and all(p.target for p in pairs)
    train_part, val = split_validation(pairs, 0.2, seed=0)
    assert len(val) == 2 and len(train_part) == 8
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "t1"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: each line needs"):
        jsonl_texts(bad)
