"""``dlmskip train --target-ratio R`` (issue 20, item 1): the dual step on the routers' execute
offset by hand, the bisection that calibrates it, training's decided ratio against RoutedSkip's,
a budget run whose ratio measured by a real lm-eval evaluation lands within 0.02 of R, exact resume,
and the refusals of bad budgets before anything is loaded."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from lm_eval_dlmskip.skipping.policies import ForwardBatch
from lm_eval_dlmskip.skipping.routers import EXECUTE, SKIP, GumbelRouting, RoutedSkip, RouterConfig, Routers
from lm_eval_dlmskip.train.budget import DualAscent, calibrate_offset
from lm_eval_dlmskip.train.config import TrainConfig
from lm_eval_dlmskip.train.objective import RouterObjective, collate

from .conftest import MASK_ID, REFERENCE, words, write_task

PAD_ID = 251


def test_the_dual_step_moves_every_routers_execute_bias_by_hand():
    """Target 0.7, dual_lr 0.5, measured 1.0, 0.9, 0.6, 0.7: c = -0.15, -0.25, -0.20, -0.20; each
    router's execute bias is its initial 4.0 plus c, its skip bias stays 0."""
    routers = Routers(RouterConfig(d_model=8, n_layers=3, hidden=4, init_bias=4.0))
    weights = [r.net[-1].weight.clone() for r in routers.routers]
    dual = DualAscent(target=0.7, lr=0.5)
    offsets = [dual.update(torch.tensor(m), routers).item() for m in (1.0, 0.9, 0.6, 0.7)]
    assert offsets == pytest.approx([-0.15, -0.25, -0.20, -0.20])
    for router, weight in zip(routers.routers, weights):
        assert router.net[-1].bias[EXECUTE].item() == pytest.approx(4.0 - 0.20)
        assert router.net[-1].bias[SKIP].item() == 0.0
        assert torch.equal(router.net[-1].weight, weight)


def test_calibration_bisects_to_the_offset_nearest_the_target():
    """A step function of the offset, ratio = 0.5 + floor(8 c) / 40 clipped to [0, 1]: for 0.7 the
    search tries 0, 8, 4, 2 and stops at 1 (ratio exactly 0.7); for 0.31, which no offset gives
    (0.3 and 0.325 do), it searches below 0 to the end and returns the nearest, 0.3."""
    tried = []

    def measure(c: float) -> float:
        tried.append(c)
        return min(1.0, max(0.0, 0.5 + int(8 * c // 1) / 40))

    result = calibrate_offset(measure, 0.7)
    assert tried == [0.0, 8.0, 4.0, 2.0, 1.0]
    assert (result.offset, result.ratio, result.start_ratio, result.evaluations) == (1.0, 0.7, 0.5, 5)
    tried.clear()
    low = calibrate_offset(measure, 0.31)
    assert tried[:4] == [0.0, -8.0, -4.0, -2.0] and len(tried) == 17 == low.evaluations
    assert low.ratio == 0.3 == measure(low.offset) and -1.0 <= low.offset < -0.875


def test_training_decides_its_measured_ratio_as_routed_skip_does():
    """Gumbel noise decides training's gates; the ratio the budget steps on is the noiseless one:
    argmax votes over masked positions and a share strictly above tau, as lm_eval runs them."""
    torch.manual_seed(0)
    routers = Routers(RouterConfig(d_model=8, n_layers=1, hidden=8, init_bias=0.0, tau=0.25))
    torch.nn.init.normal_(routers.routers[0].net[-1].weight, std=2.0)
    ids = torch.full((64, 8), MASK_ID)
    ids[torch.rand(64, 8, generator=torch.Generator().manual_seed(1)) < 0.4] = 7
    ids[5] = 7  # a row with nothing masked runs the block
    batch = ForwardBatch.of(ids, None, MASK_ID)
    h = torch.randn(64, 8, 8, generator=torch.Generator().manual_seed(2))
    routing = GumbelRouting(routers, 1.0, torch.Generator().manual_seed(3))
    noisy = routing.rows_to_run(0, h, batch)
    with torch.no_grad():
        expected = RoutedSkip(routers, 0.25).rows_to_run(0, h, batch)
    assert routing.decided[0].bool().tolist() == expected.tolist()
    assert 0 < expected.float().mean() < 1 and not torch.equal(noisy.bool(), expected)  # the noise decides otherwise
    assert routing.decided_execution().tolist() == expected.float().tolist()


def test_a_budget_run_trains_on_the_cross_entropy_alone(ref_model):
    """With --target-ratio the loss is CE / p_mask, the same as the fixed recipe at lambda 0."""
    torch.manual_seed(0)
    routers = Routers(RouterConfig(d_model=64, n_layers=6, hidden=16, init_bias=0.0))
    batch = collate([type("P", (), {"prompt": [1, 2, 3], "target": [4, 5, 6, 7, 8]})()] * 3, PAD_ID)
    budget = TrainConfig(model="m", output="o", data="d", target_ratio=0.6)
    fixed = TrainConfig(model="m", output="o", data="d", lam=0.0)
    loss, stats = RouterObjective(ref_model, routers, budget, MASK_ID)(batch, torch.Generator().manual_seed(4))
    reference, _ = RouterObjective(ref_model, routers, fixed, MASK_ID)(batch, torch.Generator().manual_seed(4))
    assert loss.item() == reference.item()
    assert stats["skip_loss"].item() == pytest.approx(1 - stats["alpha"].item() - 0.6, rel=1e-5)


ANSWER = 6  # tokens of every answer: generation masks 6, 5, .., 1 of them, as training's held-out draws


def _budget_task(root: Path) -> Path:
    """A generation task in the reference tokenizer's words with a training split (80 documents)
    and a test split (32 others) drawn alike."""
    rng = random.Random(0)

    def docs(n):
        return [{"prompt": words([rng.randrange(240) for _ in range(rng.randint(3, 6))]),
                 "answer": words([rng.randrange(240) for _ in range(ANSWER)])} for _ in range(n)]

    root.mkdir(parents=True, exist_ok=True)
    (root / "train.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs(80)))
    write_task(root, "budget_gen", docs(32),
               f'training_split: train\noutput_type: generate_until\ndoc_to_text: "{{{{prompt}}}}"\n'
               f'doc_to_target: " {{{{answer}}}}"\ngeneration_kwargs:\n  until: [t248]\n  max_gen_toks: {ANSWER}\n'
               f"  steps: {ANSWER}\n  block_length: {ANSWER}\nmetric_list:\n  - metric: exact_match\n")
    yaml = root / "budget_gen.yaml"
    yaml.write_text(yaml.read_text().replace("    test:", f"    train: {root / 'train.jsonl'}\n    test:", 1))

    long = (root / "budget_gen.yaml").read_text().replace("task: budget_gen", "task: budget_long")
    for key in ("max_gen_toks", "steps", "block_length"):  # a canvas twice the answer, as gsm8k's 256 tokens
        long = long.replace(f"  {key}: {ANSWER}\n", f"  {key}: {2 * ANSWER}\n")
    (root / "budget_long.yaml").write_text(long)

    def choices(docs):  # the gold answer and two others of the same length, gold at a varying place
        for i, d in enumerate(docs):
            wrong = [words([rng.randrange(240) for _ in range(ANSWER)]) for _ in range(2)]
            d["choices"] = [" " + c for c in wrong[: i % 3] + [d["answer"]] + wrong[i % 3 :]]
            d["label"] = i % 3
        return docs

    (root / "mc_train.jsonl").write_text("".join(json.dumps(d) + "\n" for d in choices(docs(80))))
    write_task(root, "budget_mc", choices(docs(32)),
               'training_split: train\noutput_type: multiple_choice\ndoc_to_text: "{{prompt}}"\n'
               'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n')
    yaml = root / "budget_mc.yaml"
    yaml.write_text(yaml.read_text().replace("    test:", f"    train: {root / 'mc_train.jsonl'}\n    test:", 1))
    return root


def _train_args(tasks: Path, out: Path, *extra: str, task: str = "budget_gen") -> list[str]:
    return ["train", "--model", str(REFERENCE), "--task", task, "--include-path", str(tasks), "--output", str(out),
            "--router-hidden", "16", "--batch-size", "8", "--effective-batch-size", "16", "--lr", "1e-2",
            "--warmup-steps", "2", "--val-fraction", "0.25", "--eval-every", "1000", "--log-every", "5",
            "--dtype", "float32", "--device", "cpu", *extra]


@pytest.mark.slow
def test_routers_trained_to_a_target_run_that_share_of_blocks_in_lm_eval(tmp_path, capsys):
    """80 steps at --target-ratio 0.75 on the 6-block model; then a real lm-eval evaluation of
    the test split (other documents) with the routers: the papers' normalized FLOPs it reports,
    counted from the blocks each forward ran, is within 0.02 of 0.75. router.json and the closing
    message give the target, the ratio achieved through lm_eval on the held-out documents and the
    dual variable."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lm_eval_dlmskip.cli import main
    from lm_eval_dlmskip.harness.llada import LLaDASkipLM

    tasks, out = _budget_task(tmp_path / "tasks"), tmp_path / "r75"
    assert main(_train_args(tasks, out, "--target-ratio", "0.75", "--max-steps", "80")) == 0
    meta = json.loads((out / "router.json").read_text())
    budget = meta["budget"]
    assert meta["lambda"] is None and meta["target_ratio"] == 0.75 and budget["target_ratio"] == 0.75
    assert abs(budget["achieved_ratio"] - 0.75) <= 0.02 and budget["measured_on"].startswith("lm_eval (llada_skip) over budget_gen: 20 held-out")
    assert budget["uncalibrated_ratio"] < 0.95  # training itself moved the routers toward the target
    printed = capsys.readouterr().out
    assert f"execution ratio: target 0.750, achieved {budget['achieved_ratio']:.4f}" in printed
    assert f"dual variable at the end of training (execute-logit offset) {budget['dual_offset']:+.4f}" in printed
    lm = LLaDASkipLM(pretrained=str(REFERENCE), device="cpu", batch_size=8, router=str(out))
    results = simple_evaluate(model=lm, tasks=["budget_gen"], task_manager=TaskManager(include_path=str(tasks)))
    flops = results["config"]["dlmskip"]["flops"]["budget_gen"]
    assert flops["forwards"] == 32 * ANSWER
    assert abs(flops["normalized_flops_papers"] - 0.75) <= 0.02, flops["normalized_flops_papers"]


@pytest.mark.slow
def test_a_budget_is_calibrated_on_the_evaluations_own_forwards(tmp_path):
    """Multiple choice scores every choice, wrong ones included, with lm_eval's Monte-Carlo masks:
    the last calibration runs those very forwards over the held-out training documents. The ratio
    router.json records is the one lm_eval reports for a task made of exactly those documents (the
    seeded shuffle's first quarter, as --val-fraction 0.25 documents), to the last digit: same
    requests, same masks, the saved routers as lm_eval loads them. On the test split (other
    documents) it lands within 0.02 of the target."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lm_eval_dlmskip.cli import main
    from lm_eval_dlmskip.harness.llada import LLaDASkipLM

    tasks, out = _budget_task(tmp_path / "tasks"), tmp_path / "r75"
    extra = ["--target-ratio", "0.75", "--max-steps", "80", "--eval-model-args", "mc_num=8"]
    assert main(_train_args(tasks, out, *extra, task="budget_mc")) == 0
    budget = json.loads((out / "router.json").read_text())["budget"]
    assert budget["measured_on"] == "lm_eval (llada_skip) over budget_mc: 20 held-out documents of its train split, model_args mc_num=8"
    order = list(range(80))
    random.Random(0).shuffle(order)  # the held-out slice: --seed 0's shuffle of the 80 training documents
    train_docs = (tasks / "mc_train.jsonl").read_text().splitlines()
    held = tmp_path / "held"
    write_task(held, "budget_mc", [json.loads(train_docs[i]) for i in sorted(order[:20])],
               (tasks / "budget_mc.yaml").read_text().split("test_split: test\n", 1)[1].replace("training_split: train\n", ""))
    ratios = {}
    for name, folder in (("held", held), ("test", tasks)):
        lm = LLaDASkipLM(pretrained=str(REFERENCE), device="cpu", batch_size=8, router=str(out), mc_num=8)
        results = simple_evaluate(model=lm, tasks=["budget_mc"], task_manager=TaskManager(include_path=str(folder)))
        ratios[name] = results["config"]["dlmskip"]["flops"]["budget_mc"]["normalized_flops_papers"]
    assert ratios["held"] == pytest.approx(budget["achieved_ratio"], abs=1e-12), (ratios, budget)
    assert abs(budget["achieved_ratio"] - 0.75) <= 0.005
    assert abs(ratios["test"] - 0.75) <= 0.02, ratios


def test_a_budget_run_resumes_exactly(tmp_path, monkeypatch):
    """Stopped after its save at step 4 of 8 and resumed: the same routers, dual variable included."""
    import lm_eval_dlmskip.train.loop as train_module
    from lm_eval_dlmskip.cli import main

    tasks = _budget_task(tmp_path / "tasks")
    args = ["--target-ratio", "0.6", "--max-steps", "8", "--save-every", "4", "--val-fraction", "0.1"]
    assert main(_train_args(tasks, tmp_path / "straight", *args)) == 0
    real = train_module.step_examples

    def dies(pairs, step, per_step, seed):
        if step == 5:
            raise KeyboardInterrupt
        return real(pairs, step, per_step, seed)

    monkeypatch.setattr(train_module, "step_examples", dies)
    assert main(_train_args(tasks, tmp_path / "resumed", *args)) == 130
    state = json.loads((tmp_path / "resumed" / "train_state.json").read_text())
    assert state["step"] == 4 and state["budget_offset"] < 0
    monkeypatch.setattr(train_module, "step_examples", real)
    assert main(_train_args(tasks, tmp_path / "resumed", *args, "--resume")) == 0
    from safetensors.torch import load_file

    straight, resumed = (load_file(str(tmp_path / n / "router.safetensors")) for n in ("straight", "resumed"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    budgets = [json.loads((tmp_path / n / "router.json").read_text())["budget"] for n in ("straight", "resumed")]
    assert budgets[0] == budgets[1]


@pytest.mark.parametrize("extra, message", [
    (["--target-ratio", "1.0"], r"--target-ratio 1.0 must be in \(0, 1\): the fraction of blocks executed"),
    (["--target-ratio", "0"], r"--target-ratio 0.0 must be in \(0, 1\)"),
    (["--target-ratio", "-0.2"], r"--target-ratio -0.2 must be in \(0, 1\)"),
    (["--target-ratio", "0.8", "--lambda", "1"], r"--target-ratio and --lambda both given: .*give --target-ratio alone, "
                                                 r"or --lambda \(and --alpha-target\) for the paper's fixed penalty"),
    (["--target-ratio", "0.8", "--alpha-target", "0.3"], r"--target-ratio and --alpha-target both given"),
    (["--target-ratio", "0.8", "--dual-lr", "0"], r"--dual-lr 0.0 must be > 0"),
    (["--target-ratio", "0.8", "--eval-model-args", "mc_num=8"], r"--eval-model-args are the lm_eval calibration's; "
                                                                  r"they do nothing with --calibrate-on held-out or --data"),
    (["--target-ratio", "0.8", "--calibrate-on", "lm_eval"], r"--calibrate-on lm_eval runs the task's own requests; --data has no task"),
    (["--eval-model-args", "mc_num=8"], r"--calibrate-on and --eval-model-args set --target-ratio's calibration"),
])
def test_bad_budgets_are_refused_before_anything_is_loaded(tmp_path, capsys, extra, message):
    from lm_eval_dlmskip.cli import main

    nowhere = tmp_path / "no-model"
    args = ["train", "--model", str(nowhere), "--data", str(tmp_path / "no-data.jsonl"), "--output", str(tmp_path / "r"), *extra]
    assert main(args) == 2
    import re

    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "r").exists()


def test_routers_started_from_a_profile_skip_its_blocks_as_static_skipping_does(ref_model):
    """Item 2: --init-profile starts the profile's blocks skipped. How many: --init-k, else the
    budget's share of blocks (at most the profile's choices), else all; then the fresh routers run
    exactly what StaticSkip runs, with the same logits."""
    from lm_eval_dlmskip.skipping.policies import StaticSkip
    from lm_eval_dlmskip.train.budget import initial_skips, start_skipping

    order = [5, 2, 7, 1]
    assert initial_skips(order, 8, 0.75, None) == [2, 5]  # round(0.25 x 8) = 2 of its choices
    assert initial_skips(order, 8, 0.75, 3) == [2, 5, 7]
    assert initial_skips(order, 8, None, None) == [1, 2, 5, 7]
    assert initial_skips(order, 8, 0.1, None) == [1, 2, 5, 7]  # the budget would skip 7: all 4 it chose
    torch.manual_seed(0)
    routers = Routers(RouterConfig(d_model=64, n_layers=6, hidden=16, init_bias=4.0))
    start_skipping(routers, [1, 4])
    ids = torch.randint(0, 240, (4, 12), generator=torch.Generator().manual_seed(0))
    ids[:, 6:] = MASK_ID
    with torch.no_grad():
        routed_logits, routed = ref_model(ids, policy=RoutedSkip(routers, 0.1))
        static_logits, static = ref_model(ids, policy=StaticSkip(frozenset({1, 4})))
    assert routed.executed.tolist() == static.executed.tolist() == [[True, False, True, True, False, True]] * 4
    assert torch.equal(routed_logits, static_logits)


@pytest.mark.parametrize("given, message", [
    ("mc_nm=8", r"--eval-model-args 'mc_nm=8': llada_skip: unknown model_args key 'mc_nm'. Did you mean 'mc_num'\?"),
    ("router=/r", r"--eval-model-args 'router=/r': router is set by dlmskip train"),
    ("threshold=2", r"--eval-model-args 'threshold=2': llada_skip: threshold"),
])
def test_eval_model_args_are_judged_before_the_weights_load(tmp_path, monkeypatch, capsys, given, message):
    import re

    import lm_eval_dlmskip.train.loop as train_module
    from lm_eval_dlmskip.cli import main

    def no_weights(*args, **kwargs):
        raise AssertionError("loaded the weights before judging --eval-model-args")

    monkeypatch.setattr(train_module, "load_model", no_weights)
    tasks = _budget_task(tmp_path / "tasks")
    assert main(_train_args(tasks, tmp_path / "r", "--target-ratio", "0.8", "--eval-model-args", given)) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "r").exists()


def test_init_profile_settings_are_checked_before_loading(tmp_path, capsys):
    from lm_eval_dlmskip.cli import main

    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"format": 1, "kind": "lm_eval_dlmskip.skip_profile", "selection_order": [3, 1]}))
    base = ["train", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "d.jsonl"), "--output", str(tmp_path / "r")]
    assert main([*base, "--init-k", "1"]) == 2
    assert "--init-k needs --init-profile PATH" in capsys.readouterr().err
    assert main([*base, "--init-profile", str(profile), "--init-k", "3"]) == 2
    assert f"--init-k 3: the profile {profile} chose 2 blocks; give 0..2" in capsys.readouterr().err
    assert main([*base, "--init-profile", str(tmp_path / "none.json")]) == 2
    assert "no such file; make one with dlmskip calibrate" in capsys.readouterr().err


def test_kept_blocks_always_run_and_bound_the_budget(ref_model, tmp_path, monkeypatch, capsys):
    """--keep-blocks: those blocks run whatever their routers would vote, in training's routing
    and in RoutedSkip (whose FLOPs count only the routers consulted), the setting survives the
    checkpoint, and a --target-ratio at or below their share, or a kept block out of range or given
    twice, is refused after reading config.json and before any weight is read."""
    import lm_eval_dlmskip.train.loop as train_module
    from lm_eval_dlmskip.cli import main
    from lm_eval_dlmskip.models.loading import load_llada
    from lm_eval_dlmskip.skipping.identity import model_identity
    from lm_eval_dlmskip.skipping.router_checkpoints import load_routers, save_routers

    routers = Routers(RouterConfig(d_model=64, n_layers=6, hidden=16, init_bias=-10.0, keep=[3, 0]))  # all vote skip
    ids = torch.randint(0, 240, (3, 10), generator=torch.Generator().manual_seed(0))
    ids[:, 5:] = MASK_ID
    with torch.no_grad():
        _, trace = ref_model(ids, policy=RoutedSkip(routers, 0.1))
        routing = GumbelRouting(routers, 1.0, torch.Generator().manual_seed(0))
        ref_model(ids, policy=routing)
    assert trace.executed.tolist() == [[True, False, False, True, False, False]] * 3 and trace.routed_layers == 4
    assert routing.decided_execution().tolist() == pytest.approx([2 / 6] * 3) and routing.alpha().tolist() == pytest.approx([4 / 6] * 3)
    base = load_llada(str(REFERENCE))
    save_routers(tmp_path / "kept", routers, model_identity(base.model.cfg, str(REFERENCE), base.fingerprint), {})
    assert load_routers(tmp_path / "kept", base.model.cfg, base.fingerprint).routers.cfg.keep == (0, 3)

    def no_weights(*args, **kwargs):
        raise AssertionError("weights read before the budget was checked")

    monkeypatch.setattr(train_module, "load_model", no_weights)
    args = ["train", "--model", str(REFERENCE), "--data", str(tmp_path / "d.jsonl"), "--output", str(tmp_path / "r")]
    assert main([*args, "--keep-blocks", "0,5,2", "--target-ratio", "0.5"]) == 2
    assert ("--target-ratio 0.5 is at or below what the routers can reach: 3 of 6 blocks always run (--keep-blocks), "
            "so at least 0.5000 of the blocks execute") in capsys.readouterr().err
    assert main([*args, "--keep-blocks", "0,6", "--target-ratio", "0.7"]) == 2
    assert ('--keep-blocks 0,6 ("keep" in router.json): give distinct 0-based blocks in 0..5 (the papers number them 1..6)'
            in capsys.readouterr().err)
    assert main([*args, "--keep-blocks", "2,2", "--target-ratio", "0.7"]) == 2
    assert '--keep-blocks 2,2 ("keep" in router.json): give distinct 0-based blocks in 0..5' in capsys.readouterr().err
