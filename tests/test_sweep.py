"""dlmskip sweep: the grid, runs keyed by what they evaluate, a manifest that keeps earlier calls,
a dry run that writes nothing; and calibrate's refusal to replace a profile."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from lm_eval_dlmskip.report import sweep


def _profile(path: Path, order: list[int]) -> Path:
    """A skip profile as far as the sweep reads one (its selection order)."""
    path.write_text(json.dumps({"format": 1, "kind": "lm_eval_dlmskip.skip_profile", "selection_order": order,
                                "skip_layers": sorted(order)}))
    return path


def _router(path: Path, weights: bytes = b"w0") -> Path:
    """A router folder as far as the sweep reads one (its files' bytes and its shape)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "router.json").write_text(json.dumps({"router": {"hidden": 16, "tau": 0.1}}))
    (path / "router.safetensors").write_bytes(weights)
    return path


def _sweep_args(tmp_path, **kwargs):
    parser = argparse.ArgumentParser()
    sweep.add_arguments(parser)
    args = parser.parse_args(["--model", "M", "--tasks", "piqa", "--out", str(tmp_path / "sweep")])
    for k, v in kwargs.items():
        setattr(args, k, v)
    return args


class FakeLmEval:
    """Stands in for the lm_eval subprocess: writes a results file (or fails for the named runs)."""

    def __init__(self, failing: tuple[str, ...] = ()) -> None:
        self.failing = failing
        self.runs: list[str] = []  # the run names since the last clear()
        self.calls = 0  # all calls: names each results file uniquely

    def __call__(self, cmd: list[str]):
        target = Path(cmd[cmd.index("--output_path") + 1])
        self.runs.append(target.name)
        self.calls += 1
        (target / "model").mkdir(parents=True, exist_ok=True)
        failed = target.name in self.failing
        if not failed:
            (target / "model" / f"results_{self.calls}.json").write_text(cmd[cmd.index("--model_args") + 1])
        return type("Done", (), {"returncode": int(failed)})()


@pytest.fixture
def lm_eval(monkeypatch) -> FakeLmEval:
    fake = FakeLmEval()
    monkeypatch.setattr(sweep.subprocess, "run", fake)
    return fake


def test_sweep_plans_the_grid_and_resumes(tmp_path, lm_eval):
    profile = _profile(tmp_path / "p.json", [6, 2, 4])
    args = _sweep_args(tmp_path, skip_profile=str(profile), static_k=2, random_k="1,3", random_seeds="0,1",
                       routers=[str(_router(tmp_path / "ckpts" / "gsm8k-l0.3"))], model_args="mc_num=16,cfg=0",
                       lm_eval_args="--limit 4")
    runs = sweep.plan_runs(args)
    names = [run.name for run in runs]
    assert names == ["base", "static-k1", "static-k2", "random-k1-seed0", "random-k1-seed1", "random-k3-seed0",
                     "random-k3-seed1", "routed-gsm8k-l0.3"]
    plans = {run.name: run for run in runs}
    assert plans["static-k2"].model_args == {"pretrained": "M", "mc_seed": 1234, "mc_num": 16, "cfg": 0,
                                            "skip_profile": str(profile), "skip_k": 2}
    # The key holds the blocks the profile selects, not its path.
    assert plans["static-k2"].key["model_args"] == {"pretrained": "M", "mc_seed": 1234, "mc_num": 16, "cfg": 0, "skip_layers": [2, 6]}
    assert plans["static-k2"].key["lm_eval_args"] == ["--limit", "4"] and plans["base"].key["tasks"] == "piqa"
    lm_eval.failing = ("random-k3-seed1",)
    assert sweep.run_sweep(args) == 1  # one run failed
    assert lm_eval.runs == names
    assert json.loads((tmp_path / "sweep" / "base" / "model" / "results_1.json").read_text())["mc_num"] == 16
    lm_eval.runs.clear()
    assert sweep.run_sweep(args) == 1  # only the failed run is retried
    assert lm_eval.runs == ["random-k3-seed1"]
    manifest = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [r["run"] for r in manifest["runs"]] == names
    assert manifest["runs"][2]["key"]["model_args"]["skip_layers"] == [2, 6]


def test_a_recalibrated_profile_is_never_reused_under_the_old_name(tmp_path, lm_eval, capsys):
    """The issue's case: calibrate replaced the profile ([6] -> [5]); static-k1 of the earlier call
    must not be reused. Refused, naming what changed; --rerun-stale deletes and runs it again."""
    profile = _profile(tmp_path / "p.json", [6, 2])
    args = _sweep_args(tmp_path, skip_profile=str(profile), static_k=2)
    assert sweep.run_sweep(args) == 0
    _profile(profile, [5, 2])
    lm_eval.runs.clear()
    with pytest.raises(ValueError, match=r"(?s)static-k1: skip_layers \[6\] -> \[5\].*"
                                         r"static-k2: skip_layers \[2, 6\] -> \[2, 5\].*--rerun-stale"):
        sweep.run_sweep(args)
    assert lm_eval.runs == []
    args.rerun_stale = True
    assert sweep.run_sweep(args) == 0
    assert lm_eval.runs == ["static-k1", "static-k2"]  # base is unchanged, so reused
    results = list((tmp_path / "sweep" / "static-k1").rglob("results_*.json"))
    assert len(results) == 1 and results[0].name == "results_4.json"  # the stale results are gone
    assert "base] results exist for the same settings, reused" in capsys.readouterr().out


def test_a_retrained_router_is_rerun_and_a_moved_one_reused(tmp_path, lm_eval):
    router = _router(tmp_path / "a" / "gsm8k")
    args = _sweep_args(tmp_path, routers=[str(router)], rerun_stale=True)
    assert sweep.run_sweep(args) == 0 and lm_eval.runs == ["base", "routed-gsm8k"]
    moved = tmp_path / "b" / "gsm8k"
    shutil.copytree(router, moved)
    lm_eval.runs.clear()
    assert sweep.run_sweep(_sweep_args(tmp_path, routers=[str(moved)])) == 0
    assert lm_eval.runs == []  # the same weights: the same run, wherever they lie
    (moved / "router.safetensors").write_bytes(b"w1")  # retrained in place
    with pytest.raises(ValueError, match=r"routed-gsm8k: router \{'weights': "):
        sweep.run_sweep(_sweep_args(tmp_path, routers=[str(moved)]))
    assert sweep.run_sweep(_sweep_args(tmp_path, routers=[str(moved)], rerun_stale=True)) == 0
    assert lm_eval.runs == ["routed-gsm8k"]


@pytest.mark.parametrize("change, message", [
    (dict(model_args="mc_num=8"), "mc_num None -> 8"),
    (dict(lm_eval_args="--limit 2"), r"lm_eval_args \[\] -> \['--limit', '2'\]"),
    (dict(tasks="arc_easy"), "tasks 'piqa' -> 'arc_easy'"),
    (dict(include_path="tasks/"), "include_path None -> 'tasks/'"),
    (dict(model="N"), "pretrained 'M' -> 'N'"),
])
def test_every_model_arg_and_task_setting_is_in_the_key(tmp_path, lm_eval, change, message):
    assert sweep.run_sweep(_sweep_args(tmp_path)) == 0
    with pytest.raises(ValueError, match=f"base: {message}"):
        sweep.run_sweep(_sweep_args(tmp_path, **change))


def test_results_without_a_recorded_key_are_not_reused(tmp_path, lm_eval):
    """Results an older sweep (or a hand-run lm_eval) left under a run's name prove nothing."""
    (tmp_path / "sweep" / "base" / "model").mkdir(parents=True)
    (tmp_path / "sweep" / "base" / "model" / "results_old.json").write_text("{}")
    with pytest.raises(ValueError, match="base: its key was not recorded"):
        sweep.run_sweep(_sweep_args(tmp_path))
    assert lm_eval.runs == []


def test_sweep_json_keeps_the_runs_of_earlier_calls(tmp_path, lm_eval):
    assert sweep.run_sweep(_sweep_args(tmp_path, random_k="1")) == 0
    assert sweep.run_sweep(_sweep_args(tmp_path, random_k="2", random_seeds="0,1")) == 0
    manifest = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [r["run"] for r in manifest["runs"]] == ["base", "random-k1-seed0", "random-k2-seed0", "random-k2-seed1"]
    assert lm_eval.runs == ["base", "random-k1-seed0", "random-k2-seed0", "random-k2-seed1"]


def test_dry_run_writes_nothing(tmp_path, lm_eval, capsys):
    profile = _profile(tmp_path / "p.json", [3])
    args = _sweep_args(tmp_path, skip_profile=str(profile), static_k=1, random_k="1", dry_run=True)
    assert sweep.run_sweep(args) == 0
    assert not (tmp_path / "sweep").exists() and lm_eval.runs == []
    assert "static-k1] " in capsys.readouterr().out
    args.dry_run = False
    assert sweep.run_sweep(args) == 0
    before = {p: p.read_bytes() for p in (tmp_path / "sweep").rglob("*") if p.is_file()}
    _profile(profile, [4])
    args.dry_run, args.rerun_stale, args.random_k = True, True, "1,2"
    lm_eval.runs.clear()
    assert sweep.run_sweep(args) == 0
    assert "static-k1] would delete results made with other settings" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in (tmp_path / "sweep").rglob("*") if p.is_file()} == before
    assert lm_eval.runs == [] and not (tmp_path / "sweep" / "random-k2-seed0").exists()


def test_sweep_checks_its_inputs_before_any_run(tmp_path, lm_eval):
    with pytest.raises(ValueError, match="--static-k needs --skip-profile"):
        sweep.plan_runs(_sweep_args(tmp_path, static_k=2))
    with pytest.raises(ValueError, match="no such file; make one with dlmskip calibrate"):
        sweep.run_sweep(_sweep_args(tmp_path, skip_profile=str(tmp_path / "none.json"), static_k=1))
    with pytest.raises(ValueError, match="--static-k 3: the profile .* chose 2 blocks; give at most 2"):
        sweep.run_sweep(_sweep_args(tmp_path, skip_profile=str(_profile(tmp_path / "p.json", [1, 3])), static_k=3))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "router.json").write_text("{}")
    with pytest.raises(ValueError, match="router.safetensors is missing; is this a router checkpoint"):
        sweep.run_sweep(_sweep_args(tmp_path, routers=[str(tmp_path / "half")]))
    with pytest.raises(ValueError, match="no such checkpoint directory"):
        sweep.run_sweep(_sweep_args(tmp_path, routers=[str(tmp_path / "nowhere")]))
    assert lm_eval.runs == [] and not (tmp_path / "sweep").exists()


def test_sweep_gives_every_run_the_same_mask_seed(tmp_path):
    """Random runs vary ``seed`` (the skipping draw); the Monte-Carlo masks stay those of the base run."""
    args = _sweep_args(tmp_path, random_k="2", random_seeds="0,1,2", routers=[str(_router(tmp_path / "r"))])
    plans = {run.name: run.model_args for run in sweep.plan_runs(args)}
    assert {run["mc_seed"] for run in plans.values()} == {1234}
    assert [plans[f"random-k2-seed{s}"]["seed"] for s in range(3)] == [0, 1, 2]
    assert {run.model_args["mc_seed"] for run in sweep.plan_runs(_sweep_args(tmp_path, random_k="2", mc_seed=7))} == {7}
    given = _sweep_args(tmp_path, random_k="2", model_args="mc_seed=9")
    assert {run.model_args["mc_seed"] for run in sweep.plan_runs(given)} == {9}


def test_calibrate_refuses_to_replace_a_profile_before_loading_the_model(tmp_path, capsys):
    from lm_eval_dlmskip.cli import main

    profile = _profile(tmp_path / "p.json", [6])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("t1 t2 t3\n")
    code = main(["calibrate", "--model", str(tmp_path / "no_model_here"), "--data", str(prompts), "--output", str(profile)])
    assert code == 2
    assert f"--output {profile} exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert json.loads(profile.read_text())["selection_order"] == [6]


def test_calibrate_overwrite_replaces_the_profile(tmp_path, ref_dir):
    from lm_eval_dlmskip.cli import main

    profile = _profile(tmp_path / "p.json", [6])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("t1 t2 t3\nt4 t5\n")
    args = ["calibrate", "--model", str(ref_dir), "--data", str(prompts), "--output", str(profile), "--dtype", "float32",
            "--threshold", "-1", "--max-skip", "2"]
    assert main(args + ["--overwrite"]) == 0
    replaced = json.loads(profile.read_text())
    assert len(replaced["selection_order"]) == 2 and "similarity" in replaced


class TrainsAndFakesLmEval(FakeLmEval):
    """Runs ``python -m lm_eval_dlmskip.train`` commands for real (in this process); fakes lm_eval."""

    def __init__(self) -> None:
        super().__init__()
        self.trained: list[str] = []  # the router folders trained since the last clear

    def __call__(self, cmd: list[str]):
        if cmd[1:3] != ["-m", "lm_eval_dlmskip.train"]:
            return super().__call__(cmd)
        from lm_eval_dlmskip.train.cli import main

        self.trained.append(Path(cmd[cmd.index("--output") + 1]).name)
        return type("Done", (), {"returncode": main(cmd[3:])})()


TRAIN_ARGS = ("--router-hidden 16 --batch-size 8 --effective-batch-size 8 --max-steps 3 --warmup-steps 1 --lr 1e-2 "
              "--dtype float32 --device cpu --eval-every 1000 --val-fraction 0.1")


@pytest.mark.slow
def test_routed_targets_train_routers_once_and_rerun_when_their_recipe_changes(tmp_path, ref_dir, monkeypatch, capsys):
    """--routed-targets 0.8,0.6: two routers trained to those targets (router.json says so), each
    evaluated with its folder; a second call retrains and reruns nothing; another training argument
    makes both stale (refused, naming the change; --rerun-stale retrains and reruns them); a run
    whose training stopped resumes it."""
    from .test_budget import _budget_task

    fake = TrainsAndFakesLmEval()
    monkeypatch.setattr(sweep.subprocess, "run", fake)
    tasks = _budget_task(tmp_path / "tasks")
    args = _sweep_args(tmp_path, model=str(ref_dir), tasks="budget_gen", include_path=str(tasks), routed_targets="0.8,0.6",
                       train_args=TRAIN_ARGS)
    plans = {run.name: run for run in sweep.plan_runs(args)}
    assert list(plans) == ["base", "routed-target0.8", "routed-target0.6"]
    recipe = plans["routed-target0.8"].key["model_args"]["router"]["trained"]
    assert recipe == {"model": str(ref_dir), "task": "budget_gen", "include_path": str(tasks), "target_ratio": 0.8,
                      "train_args": TRAIN_ARGS.split()}
    assert sweep.run_sweep(args) == 0
    routers = tmp_path / "sweep" / "routers"
    assert fake.trained == ["target0.8", "target0.6"] and fake.runs == ["base", "routed-target0.8", "routed-target0.6"]
    for target in (0.8, 0.6):
        meta = json.loads((routers / f"target{target:g}" / "router.json").read_text())
        assert meta["target_ratio"] == target and meta["training"]["steps"] == 3
        [results] = (tmp_path / "sweep" / f"routed-target{target:g}").rglob("results_*.json")
        assert json.loads(results.read_text())["router"] == str(routers / f"target{target:g}")
    fake.trained.clear(), fake.runs.clear()
    assert sweep.run_sweep(args) == 0
    assert fake.trained == [] and fake.runs == []
    assert "[routed-target0.8] results exist for the same settings, reused" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "sweep" / "routed-target0.8")  # results lost, router kept: evaluated again, not retrained
    assert sweep.run_sweep(args) == 0
    assert fake.trained == [] and fake.runs == ["routed-target0.8"]
    assert f"[routed-target0.8] router {routers / 'target0.8'} trained with the same recipe, reused" in capsys.readouterr().out
    fake.runs.clear()
    changed = _sweep_args(tmp_path, model=str(ref_dir), tasks="budget_gen", include_path=str(tasks), routed_targets="0.8,0.6",
                          train_args=TRAIN_ARGS.replace("--max-steps 3", "--max-steps 4"))
    with pytest.raises(ValueError, match=r"(?s)routed-target0.8: router .*'--max-steps', '3'.* -> .*'--max-steps', '4'"
                                         r".*routed-target0.6: .*--rerun-stale"):
        sweep.run_sweep(changed)
    assert fake.trained == [] and fake.runs == []
    changed.rerun_stale = True
    assert sweep.run_sweep(changed) == 0
    assert fake.trained == ["target0.8", "target0.6"] and fake.runs == ["routed-target0.8", "routed-target0.6"]
    assert json.loads((routers / "target0.8" / "router.json").read_text())["training"]["steps"] == 4
    # training stopped before its end (here: its router.json says unfinished): the sweep resumes it
    meta_file = routers / "target0.6" / "router.json"
    meta = json.loads(meta_file.read_text())
    meta["training"]["finished"] = False
    meta_file.write_text(json.dumps(meta))
    shutil.rmtree(tmp_path / "sweep" / "routed-target0.6")
    fake.trained.clear(), fake.runs.clear()
    assert sweep.run_sweep(changed) == 0
    assert fake.trained == ["target0.6"] and fake.runs == ["routed-target0.6"]
    assert "--resume" in capsys.readouterr().out


def test_a_router_trained_with_another_recipe_is_stale_without_results(tmp_path, lm_eval):
    """A router folder the sweep trained before, whose run has no results yet: its recorded recipe
    (the file beside it) differs from this call's, so the run is refused, naming the change; a
    folder without a recorded recipe is refused too. Nothing is trained or evaluated."""
    routers = tmp_path / "sweep" / "routers"
    _router(routers / "target0.8")
    recorded = {"model": "M", "task": "piqa", "include_path": None, "target_ratio": 0.8, "train_args": ["--max-steps", "2"]}
    (routers / "target0.8.sweep_train.json").write_text(json.dumps({"run": "routed-target0.8", "recipe": recorded}))
    args = _sweep_args(tmp_path, routed_targets="0.8", train_args="--max-steps 3")
    with pytest.raises(ValueError, match=r"routed-target0\.8: its router was trained with "
                                         r"train_args \['--max-steps', '2'\] -> \['--max-steps', '3'\]\n"):
        sweep.run_sweep(args)
    (routers / "target0.8.sweep_train.json").unlink()
    with pytest.raises(ValueError, match=r"routed-target0\.8: its router was trained with .*not recorded"):
        sweep.run_sweep(args)
    assert lm_eval.runs == []


@pytest.mark.parametrize("change, message", [
    (dict(routed_targets="0.8,1.2"), r"--routed-targets 0.8,1.2: 1.2 is not in \(0, 1\)"),
    (dict(routed_targets="0.8,0.8"), "a target is given twice"),
    (dict(routed_targets="0.8", tasks="a,b"), "--tasks names 2 tasks; say which one the routers train on with --train-task"),
    (dict(routed_targets="0.8", train_args="--lambda 1"), r"--lambda is set by the sweep"),
])
def test_routed_targets_are_checked_before_any_run(tmp_path, lm_eval, change, message):
    with pytest.raises(ValueError, match=message):
        sweep.run_sweep(_sweep_args(tmp_path, **change))
    assert lm_eval.runs == [] and not (tmp_path / "sweep").exists()
