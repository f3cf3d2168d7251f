"""The installed product: the real ``lm_eval`` command finds ``llada_skip`` (and still ``hf``), the
results file carries the FLOPs, the wheel ships the start-up hook, and the demo runs offline."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .processes import ENV, launch_two, lm_eval, run

ROOT = Path(__file__).resolve().parents[1]


def test_importing_the_package_loads_neither_torch_nor_lm_eval():
    code = "import sys, lm_eval_dlmskip; print('torch' in sys.modules, 'lm_eval' in sys.modules)"
    assert run([sys.executable, "-c", code]).stdout.split() == ["False", "False"]
    # The start-up hook ran in this interpreter (the .pth), still without importing them.
    code = "import sys; print('lm_eval_dlmskip._hook' in sys.modules, 'torch' in sys.modules)"
    assert run([sys.executable, "-c", code]).stdout.split() == ["True", "False"]


def test_lm_eval_registry_knows_llada_skip_and_keeps_its_own_models():
    code = (
        "from lm_eval.api.registry import get_model, model_registry\n"
        "print(get_model('llada_skip').__name__, get_model('hf').__name__, 'vllm' in model_registry)"
    )
    assert run([sys.executable, "-c", code]).stdout.split() == ["LLaDASkipLM", "HFLM", "True"]


def test_unknown_model_lists_hf_and_llada_skip():
    done = run([sys.executable, "-m", "lm_eval", "--model", "no_such_model", "--tasks", "piqa"], check=False)
    assert done.returncode != 0
    names = done.stderr[done.stderr.index("Supported model names"):]
    assert " hf," in names and "llada_skip" in names


def test_lm_eval_cli_runs_llada_skip_and_writes_flops(tmp_path, ref_dir, ref_tasks):
    out = tmp_path / "results"
    done = lm_eval(
        "--model", "llada_skip", "--model_args", f"pretrained={ref_dir},mc_num=16,skip_layers=[1,3]",
        "--tasks", "ref_mc,ref_gen", "--include_path", str(ref_tasks), "--device", "cpu",
        "--batch_size", "4", "--output_path", str(out),
    )
    assert "ref_mc" in done.stdout and "ref_gen" in done.stdout
    assert "normalized FLOPs 0.6667 (papers)" in done.stderr
    # Below lm-eval's results table, the FLOPs table: papers', whole model, blocks, and decoding columns.
    results_table = done.stdout.index("|  Metric   |")
    flops_table = done.stdout.index("llada_skip FLOPs per task", results_table)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in done.stdout[flops_table:].splitlines()[3:] if line.startswith("|")}
    assert set(rows) == {"ref_mc", "ref_gen"}
    assert rows["ref_mc"][:3] == ["0.6667", rows["ref_mc"][1], "4.00"] and rows["ref_mc"][4:6] == ["", ""]
    assert rows["ref_gen"][0] == "0.6667" and rows["ref_gen"][4] == "8.00"  # NFE: eight denoising steps
    # Speed columns: wall seconds, tokens/s (generation only), requests/s.
    assert rows["ref_mc"][7] == "" and float(rows["ref_mc"][6]) >= 0 and float(rows["ref_mc"][8]) > 0
    assert float(rows["ref_gen"][7]) > 0
    [results_file] = list(out.rglob("results_*.json"))
    results = json.loads(results_file.read_text())
    assert set(results["results"]) == {"ref_mc", "ref_gen"}
    info = results["config"]["dlmskip"]
    assert info["skip"]["skip_layers"] == [1, 3]
    for task in ("ref_mc", "ref_gen"):
        assert info["flops"][task]["normalized_flops_papers"] == pytest.approx(4 / 6)
        assert info["flops"][task]["block_execution_ratio"] == [1, 0, 1, 0, 1, 1]
    assert info["flops"]["ref_gen"]["forwards"] == 4 * 8  # four prompts x eight denoising steps


@pytest.mark.slow
def test_a_generation_task_that_cannot_run_fails_before_the_first_request(tmp_path, ref_dir, ref_tasks):
    """Issue 17: a likelihood task and a generation task whose lengths do not fit block_length=3
    (8 tokens): lm_eval stops before its first request of any task, with our message alone
    (exit status 2, no traceback), and writes no results."""
    out = tmp_path / "results"
    done = run(
        [sys.executable, "-m", "lm_eval", "--model", "llada_skip", "--model_args", f"pretrained={ref_dir},block_length=3",
         "--tasks", "ref_mc,ref_gen", "--include_path", str(ref_tasks), "--device", "cpu", "--output_path", str(out)],
        check=False,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines()[-1] == (
        "llada_skip: error: the generation settings of 1 task(s) cannot be honoured (judged before any request ran): "
        "task ref_gen: gen_length=8 is not a multiple of block_length=3; choose block_length dividing gen_length "
        "[settings and their sources: gen_length=8 (task), steps=8 (task), block_length=3 (model_args, over the task's 4)]"
    )
    assert "Initializing llada_skip model" in done.stderr  # the model was built: this is the per-task check
    assert "Running loglikelihood requests" not in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


def test_lengths_fixed_in_model_args_fail_before_lm_eval_reads_its_tasks(ref_dir, ref_tasks):
    done = run(
        [sys.executable, "-m", "lm_eval", "--model", "llada_skip", "--model_args",
         f"pretrained={ref_dir},gen_length=8,block_length=3,steps=8", "--tasks", "ref_mc,ref_gen",
         "--include_path", str(ref_tasks)],
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        "llada_skip: error: gen_length=8 is not a multiple of block_length=3; choose block_length dividing gen_length "
        "(gen_length=8, steps=8, block_length=3 given in model_args, which no task's settings replace)"
    )
    assert "Selected Tasks" not in done.stderr and "Traceback" not in done.stderr  # before lm-eval's task index


def test_dlmskip_check_reads_no_task_index_without_tasks(ref_dir):
    code = ("import sys; from lm_eval_dlmskip.cli import main; "
            f"code = main(['check', '--model', 'llada_skip', '--model_args', 'pretrained={ref_dir}']); "
            "print(code, 'lm_eval.tasks' in sys.modules)")
    assert run([sys.executable, "-c", code]).stdout.splitlines()[-1] == "0 False"


@pytest.fixture(scope="module")
def data_parallel(tmp_path_factory, ref_dir, ref_tasks) -> dict[str, dict]:
    """The results the data-parallel tests compare, each run once: two CPU processes (gloo) that fill
    --use_cache ("first"), the same again with rank 0's cache deleted ("second": rank 1 answers all
    from its cache), and one process ("one"). Random skipping, whose draws depend on each row alone:
    whichever rank decodes a row, it skips the same blocks.
    (``accelerate launch --cpu`` starts one process only, so the ranks are started as torchrun would.)"""
    tmp = tmp_path_factory.mktemp("data_parallel")
    args = ["--model", "llada_skip", "--model_args", f"pretrained={ref_dir},mc_num=16,skip_random=2",
            "--tasks", "ref_mc,ref_gen", "--include_path", str(ref_tasks), "--batch_size", "2", "--device", "cpu"]
    cache = ["--use_cache", str(tmp / "cache")]
    launch_two([*args, *cache, "--output_path", str(tmp / "first")], tmp / "logs1")
    (tmp / "cache_rank0.db").unlink()  # rank 0 computes again; rank 1 has every answer cached
    launch_two([*args, *cache, "--output_path", str(tmp / "second")], tmp / "logs2")
    lm_eval(*args, "--output_path", str(tmp / "one"))
    return {name: json.loads(next((tmp / name).rglob("results_*.json")).read_text()) for name in ("first", "second", "one")}


def test_data_parallel_under_accelerate_matches_one_process(data_parallel):
    """Two processes split the requests; scores and FLOPs totals equal one process."""
    two, one = data_parallel["first"], data_parallel["one"]
    assert two["results"]["ref_mc"]["acc,none"] == one["results"]["ref_mc"]["acc,none"]
    assert two["results"]["ref_gen"]["exact_match,none"] == one["results"]["ref_gen"]["exact_match,none"]
    assert set(one["config"]["dlmskip"]["flops"]) == {"ref_mc", "ref_gen"}
    assert two["config"]["dlmskip"]["flops"] == one["config"]["dlmskip"]["flops"]


def test_data_parallel_with_one_rank_served_wholly_from_use_cache(data_parallel):
    """A rank whose every request comes from --use_cache never calls the model: the FLOPs merge must
    not wait for it there, and the cached answers' FLOPs still count, as in the run that computed them."""
    first, second = data_parallel["first"], data_parallel["second"]
    assert second["results"]["ref_mc"]["acc,none"] == first["results"]["ref_mc"]["acc,none"]
    assert second["config"]["dlmskip"]["flops"] == first["config"]["dlmskip"]["flops"]


def test_router_training_in_two_processes_equals_one(tmp_path, ref_dir):
    """accelerate launch with 2 CPU processes (gloo): same micro-batches and seeds as one process,
    gradients synchronised on the router parameters only; the routers agree to float rounding."""
    import random

    from safetensors.torch import load_file

    rng = random.Random(0)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(
        json.dumps({"prompt": " ".join(f"t{rng.randrange(240)}" for _ in range(5)),
                    "target": " " + " ".join(f"t{rng.randrange(240)}" for _ in range(3))}) + "\n"
        for _ in range(40)
    ))
    args = ["--model", str(ref_dir), "--data", str(data), "--router-hidden", "16", "--batch-size", "4",
            "--effective-batch-size", "16", "--lr", "1e-2", "--warmup-steps", "2", "--max-steps", "8",
            "--lambda", "5", "--dtype", "float32", "--device", "cpu", "--eval-every", "4", "--log-every", "4"]
    run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
         "-m", "lm_eval_dlmskip.train", *args, "--output", str(tmp_path / "two")])
    run([sys.executable, "-m", "lm_eval_dlmskip.cli", "train", *args, "--output", str(tmp_path / "one")])
    one, two = (load_file(str(tmp_path / d / "router.safetensors")) for d in ("one", "two"))
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    assert json.loads((tmp_path / "two" / "router.json").read_text())["training"]["effective_batch_size"] == 16


def test_lm_eval_cli_still_runs_the_hf_model(tmp_path, ref_dir, ref_tasks):
    """--model hf end to end, on a tiny GPT-2 that uses the reference tokenizer."""
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    ckpt = tmp_path / "gpt2-tiny"
    GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=16, n_layer=1, n_head=2)).save_pretrained(ckpt)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ref_dir / name, ckpt / name)
    done = lm_eval(
        "--model", "hf", "--model_args", f"pretrained={ckpt}", "--tasks", "ref_mc",
        "--include_path", str(ref_tasks), "--device", "cpu", "--limit", "2",
    )
    assert "ref_mc" in done.stdout


def test_wheel_ships_the_hook_and_entry_point_and_works_in_a_fresh_venv(tmp_path):
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)])
    [wheel] = list(tmp_path.glob("lm_eval_dlmskip-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert "lm_eval_dlmskip.pth" in names
        [entry_points] = [n for n in names if n.endswith("entry_points.txt")]
        text = z.read(entry_points).decode()
    assert "[lm_eval.models]" in text and "llada_skip = lm_eval_dlmskip.harness.llada:LLaDASkipLM" in text
    assert "dlmskip = lm_eval_dlmskip.cli:main" in text
    # A fresh venv that borrows the dependencies from this one (a plain path entry: the .pth hooks
    # of this environment are not run there), then a regular install of the wheel.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    python = str(venv / "bin" / "python")
    venv_site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    outer_site = [p for p in sys.path if p.endswith("site-packages")][0]
    Path(venv_site, "outer_dependencies.pth").write_text(outer_site + "\n")
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)])
    code = (
        "import lm_eval_dlmskip, sys; from lm_eval.api.registry import get_model\n"
        "print(get_model('llada_skip').__module__, get_model('hf').__name__, lm_eval_dlmskip.__file__.startswith(sys.prefix))"
    )
    fresh = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}  # a source tree on PYTHONPATH would come first
    assert run([python, "-c", code], cwd=tmp_path, env=fresh).stdout.split() == ["lm_eval_dlmskip.harness.llada", "HFLM", "True"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One ``dlmskip demo`` run that several tests read: its folder and its output. 20 training steps
    (the default is 400): no test reads the demo model's accuracy, and training is most of its time."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    return out, run([sys.executable, "-m", "lm_eval_dlmskip.cli", "demo", "--out", str(out), "--train-steps", "20"])


def test_demo_runs_offline(demo):
    out, done = demo
    assert done.stdout.count("demo_reverse_mc") >= 4  # two results tables and two FLOPs tables
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in done.stdout.splitlines() if line.startswith("|")]
    assert ["demo_reverse_mc", "0.7500"] in [row[:2] for row in cells]  # the FLOPs table of the skipping run
    assert (out / "llada-demo" / "model.safetensors.index.json").exists()
    # It says where everything went and how to rerun, with absolute paths.
    assert f"checkpoint  {out / 'llada-demo'}" in done.stdout
    assert f"tasks       {out / 'tasks'}" in done.stdout
    rerun = done.stdout.split("rerun the skipping run from any folder with:\n")[1].strip()
    assert rerun.startswith("lm_eval --model llada_skip") and "skip_layers=[1,3]" in rerun


def test_demo_shows_each_stage_on_a_progress_bar(demo):
    """Issue 17: the demo printed nothing while it trained. A bar on stderr names each stage in turn,
    the training step and loss among them; stdout keeps the tables alone."""
    _, done = demo
    shown = done.stderr.replace("\r", "\n")
    stages = ["training the model", "writing the checkpoint", "writing the tasks", "lm_eval without skipping",
              "lm_eval skipping blocks 1,3"]
    firsts = [shown.index(f"dlmskip demo: {stage} |") for stage in stages]
    assert firsts == sorted(firsts)
    assert re.search(r"dlmskip demo: training the model \|.*\| 0/5 stages \[[0-9:]+, step 20/20, loss [0-9.]+\]", shown)
    assert re.search(r"\| 5/5 stages \[[0-9:]+\]", shown)
    assert "stages" not in done.stdout and "loss" not in done.stdout


def test_the_printed_rerun_works_from_any_folder_and_warns_of_nothing(demo, tmp_path):
    """The demo's rerun command, from another folder (the tasks' data paths are absolute), without its
    --device (lm-eval then passes cuda:0): on a machine without CUDA the fallback to the CPU is an
    INFO line; the demo tasks declare their metrics' aggregation, so lm-eval has nothing to warn."""
    rerun = shlex.split(demo[1].stdout.split("rerun the skipping run from any folder with:\n")[1].strip())
    device = rerun.index("--device")
    done = run([sys.executable, "-m", *rerun[:device], *rerun[device + 2 :]], cwd=tmp_path)
    log = done.stdout + done.stderr
    assert "demo_reverse_gen" in done.stdout
    assert "aggregation is not" not in log and "higher_is_better is not" not in log
    assert [line for line in log.splitlines() if "WARNING" in line] == []
    import torch

    if not torch.cuda.is_available():
        assert re.search(r"INFO .*device=cuda:0 but CUDA is not available; running on cpu", log)


@pytest.mark.parametrize("command", ["demo", "train", "calibrate", "analyze", "sweep", "compare"])
def test_help_shows_the_defaults(command, capsys):
    from lm_eval_dlmskip.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    expected = {"demo": "(default: dlmskip-demo)", "train": "--lr LR (default: 5e-05)",
                "calibrate": "--revision REVISION (default: main)", "analyze": "(default: 32)",
                "sweep": "(default: 1234)", "compare": "(default: papers)"}[command]
    assert expected in text
    assert "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.parametrize("value", ["4,6", "[4,6]", "4 6", " [4, 6] ", "6,4"])
def test_demo_takes_the_natural_forms_of_skip_layers(value):
    from lm_eval_dlmskip.demo import parse_skip_layers

    assert parse_skip_layers(value) == [4, 6]


@pytest.mark.parametrize("value, message", [
    ("8", "8 out of range; the demo model's blocks are 0-based, 0..7"),
    ("-1,2", "-1 out of range"),
    ("1;3", "write 0-based block numbers"),
    ("", "name at least one block"),
    ("2,2", "named twice"),
    ("0,1,2,3,4,5,6,7", "leaves no model"),
])
def test_demo_refuses_bad_skip_layers_before_any_work(value, message, tmp_path, capsys):
    from lm_eval_dlmskip.cli import main

    assert main(["demo", "--out", str(tmp_path / "demo"), f"--skip-layers={value}"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_demo_tasks_hold_absolute_data_paths(tmp_path, monkeypatch):
    """lm_eval --include_path dlmskip-demo/tasks works from another folder."""
    import yaml

    from lm_eval_dlmskip.demo import write_tasks

    monkeypatch.chdir(tmp_path)
    tasks = write_tasks(Path("demo"), n_docs=2, n_train=2)
    for name in ("demo_reverse_mc", "demo_reverse_gen"):
        files = yaml.safe_load((tasks / f"{name}.yaml").read_text())["dataset_kwargs"]["data_files"]
        assert all(Path(f).is_absolute() and Path(f).exists() for f in files.values()), files


def test_a_second_build_reuses_the_checkpoint_and_says_so(tmp_path):
    """build_demo's three stages: trained and written the first time; the second run reuses the
    checkpoint byte for byte (no training) and names it on the bar."""
    import io

    from tqdm import tqdm

    from lm_eval_dlmskip.demo import build_demo

    shown = io.StringIO()
    first = build_demo(tmp_path, train_steps=2, bar=tqdm(total=3, file=shown))
    weights = {p.name: p.read_bytes() for p in first.glob("*.safetensors")}
    assert "step 2/2, loss" in shown.getvalue() and "3/3" in shown.getvalue()
    shown = io.StringIO()
    again = build_demo(tmp_path, train_steps=2, bar=tqdm(total=3, file=shown))
    assert again == first and {p.name: p.read_bytes() for p in again.glob("*.safetensors")} == weights
    assert f"dlmskip demo: reusing the checkpoint in {first}" in shown.getvalue() and "3/3" in shown.getvalue()
    assert "training" not in shown.getvalue()
