"""``dlmskip compare``: the leaderboard of synthetic results files, its deltas, flags, outputs and plots."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest

from lm_eval_dlmskip.report.compare import add_arguments, run_compare
from lm_eval_dlmskip.report.leaderboard import OTHER_MODEL, Row, build_leaderboard, choose_metric, load_runs

N_LAYERS = 32
PIQA = {"acc_norm,none": 0.75, "acc_norm_stderr,none": 0.01}  # acc_norm first: acc,none must still win
GSM8K = {"exact_match,flexible-extract": 0.45, "exact_match_stderr,flexible-extract": 0.013}


def write_run(root: Path, name: str, skip: dict, scores: dict[str, float], *, flops_papers: float | None = None,
              fingerprint: str = "f1", mc_num: int = 128, llada: bool = True,
              date: str = "2026-01-01T00-00-00.000000", pretrained: str = "GSAI-ML/LLaDA-8B-Base",
              family: str | None = None) -> Path:
    """A results file as llada_skip writes it, in lm-eval's layout: root/name/<model dir>/results_<date>.json.
    ``scores``: task -> its main score (acc for piqa, strict-match exact match for gsm8k_llada)."""
    if flops_papers is None:
        flops_papers = (N_LAYERS - skip.get("k", 0)) / N_LAYERS
    results, configs, flops = {}, {}, {}
    for task, score in scores.items():
        if task == "gsm8k_llada":
            results[task] = {**GSM8K, "exact_match,strict-match": score, "exact_match_stderr,strict-match": 0.012}
            configs[task] = {"task": task, "generation_kwargs": {"until": ["Question:"], "max_gen_toks": 256},
                             "metadata": {"version": 3.0}}
        else:
            results[task] = {"alias": task, **PIQA, "acc,none": score, "acc_stderr,none": 0.0107}
            configs[task] = {"task": task, "metadata": {"version": 1.0}}
        ratio = [1.0] * N_LAYERS
        for block in skip.get("skip_layers", []):
            ratio[block] = 0.0
        flops[task] = {"forwards": 100, "normalized_flops_papers": flops_papers,
                       "normalized_flops_whole_model": 0.02 + 0.98 * flops_papers,
                       "mean_executed_blocks": flops_papers * N_LAYERS, "block_execution_ratio": ratio,
                       "tflops": flops_papers, "tflops_no_skip": 1.0, "by_masked_fraction": []}
    config = {"model": "llada_skip" if llada else "hf", "limit": None}
    if llada:
        config["dlmskip"] = {
            "fingerprint": fingerprint, "pretrained": pretrained, "skip": skip,
            "likelihood": {"mc_num": mc_num, "mc_batch": 16, "cfg": 0.0}, "check_greedy": False,
            "generation": {"gen_length": None, "steps": None, "block_length": None, "cfg": 0.0,
                           "remasking": "low_confidence", "temperature": 0.0},
            "seed": 1234, "n_layers": N_LAYERS, "flops": flops,
        }
        if family is not None:
            config["dlmskip"]["family"] = family
    data = {"results": results, "group_subtasks": {}, "configs": configs, "n-shot": {t: 0 for t in scores},
            "config": config, "chat_template": None, "fewshot_as_multiturn": False, "date": 1.0}
    path = root / name / "GSAI-ML__LLaDA-8B-Base" / f"results_{date}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return root / name


def routed(lam: float) -> dict:
    return {"method": "routed", "router": f"router_ckpts/l{lam}", "tau": 0.1, "lambda": lam,
            "alpha_target": 0.5, "mask_scaling": True}


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    both = lambda piqa, gsm8k: {"piqa": piqa, "gsm8k_llada": gsm8k}  # noqa: E731
    return [
        write_run(tmp_path, "static1", {"method": "static", "skip_layers": [4], "k": 1}, both(0.68, 0.38)),
        write_run(tmp_path, "base", {"method": "none"}, both(0.70, 0.40)),
        write_run(tmp_path, "static2", {"method": "static", "skip_layers": [4, 6], "k": 2}, both(0.65, 0.30)),
        write_run(tmp_path, "random2", {"method": "random", "k": 2, "seed": 0}, both(0.60, 0.20)),
        write_run(tmp_path, "routed01", routed(0.1), both(0.71, 0.41), flops_papers=0.8),
        write_run(tmp_path, "routed03", routed(0.3), both(0.66, 0.35), flops_papers=0.6),
    ]


def compare(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run_compare(parser.parse_args([str(a) for a in argv]))


def rows_of(board, task: str) -> dict[str, Row]:
    return {r.run.name: r for r in board.rows if r.task == task}


def test_labels_order_deltas_and_flops(runs):
    board = build_leaderboard(load_runs(runs))
    piqa = [r for r in board.rows if r.task == "piqa"]
    assert [r.method for r in piqa] == [
        "base", "static k=1 [4]", "random k=2", "static k=2 [4,6]", "routed λ=0.1 τ=0.1", "routed λ=0.3 τ=0.1",
    ]
    assert [r.task for r in board.rows] == ["gsm8k_llada"] * 6 + ["piqa"] * 6
    static1 = rows_of(board, "piqa")["static1"]
    assert static1.base.name == "base" and static1.delta_points == pytest.approx(-2.0)
    assert static1.normalized_flops("papers") == 0.96875
    assert static1.normalized_flops("whole-model") == pytest.approx(0.02 + 0.98 * 0.96875)
    assert static1.flops_change_pct("papers") == pytest.approx(-3.125)
    assert rows_of(board, "gsm8k_llada")["routed01"].delta_points == pytest.approx(1.0)
    assert rows_of(board, "piqa")["base"].delta_points is None
    assert not any(r.differs_from_base for r in board.rows) and board.notes == []


def test_terminal_table_shows_percent_points_and_reduction(runs, capsys):
    assert compare(*runs) == 0
    out = capsys.readouterr().out
    assert "metric for piqa: acc,none" in out and "metric for gsm8k_llada: exact_match,strict-match" in out
    line = next(x for x in out.splitlines() if x.startswith("piqa") and "static k=1 [4]" in x)
    assert line.split()[-7:] == ["0.9688", "0.9694", "-3.12%", "68.00", "1.07", "-2.00", "97.1"]
    assert "model" not in out.splitlines()[3]  # one model: no model column


def test_metric_choice(runs, capsys):
    assert choose_metric(["acc_norm,none", "acc,none"]) == "acc,none"
    assert choose_metric(["exact_match,flexible-extract", "exact_match,strict-match"]) == "exact_match,strict-match"
    assert choose_metric(["exact_match,strip", "bleu,none"]) == "exact_match,strip"
    assert choose_metric(["bleu,none", "rouge,none"]) == "bleu,none"
    assert choose_metric(["acc_norm,none"], "acc") is None
    board = build_leaderboard(load_runs(runs), metric="exact_match,flexible-extract")
    assert board.metrics == {"piqa": None, "gsm8k_llada": "exact_match,flexible-extract"}
    assert rows_of(board, "gsm8k_llada")["base"].score == 0.45 and rows_of(board, "piqa")["base"].score is None
    assert any("piqa: no metric exact_match,flexible-extract" in n for n in board.notes)
    assert build_leaderboard(load_runs(runs), metric="acc_norm").metrics["piqa"] == "acc_norm,none"


def test_csv_and_markdown(runs, tmp_path, capsys):
    md, table = tmp_path / "out" / "board.md", tmp_path / "out" / "board.csv"
    assert compare(*runs, "--markdown", md, "--csv", table) == 0
    rows = list(csv.DictReader(table.open(newline="")))
    assert len(rows) == 12 and {r["run"] for r in rows} == {"base", "static1", "static2", "random2", "routed01",
                                                             "routed03"}
    static1 = next(r for r in rows if r["task"] == "piqa" and r["run"] == "static1")
    assert static1["method"] == "static k=1 [4]" and static1["metric"] == "acc,none" and static1["base_run"] == "base"
    assert float(static1["score"]) == 0.68 and float(static1["delta_points"]) == -2.0
    assert float(static1["flops_papers"]) == 0.96875 and float(static1["flops_change_papers_pct"]) == -3.125
    routed03 = next(r for r in rows if r["task"] == "gsm8k_llada" and r["run"] == "routed03")
    assert (routed03["lambda"], routed03["tau"], routed03["k"]) == ("0.3", "0.1", "")
    base = next(r for r in rows if r["task"] == "piqa" and r["run"] == "base")
    assert base["delta_points"] == "" and base["base_run"] == ""
    text = md.read_text()
    assert "| task | run | method | ! | FLOPs papers | FLOPs whole |" in text
    assert "| piqa | static1 | static k=1 [4] |  | 0.9688 |" in text and "| -3.12% | 68.00 | 1.07 | -2.00 |" in text
    assert "- metric for gsm8k_llada: exact_match,strict-match" in text
    assert not list(md.parent.glob(".*tmp*"))  # written through a temp file, nothing left behind


def test_mismatched_settings_are_flagged_and_a_matching_base_is_preferred(runs, tmp_path, capsys):
    root = tmp_path / "more"
    other_weights = write_run(root, "otherfp", {"method": "static", "skip_layers": [4], "k": 1},
                              {"piqa": 0.5}, fingerprint="f2")
    fewer_samples = write_run(root, "mc64", {"method": "static", "skip_layers": [4, 6], "k": 2},
                              {"piqa": 0.6}, mc_num=64)
    board = build_leaderboard(load_runs([*runs, other_weights, fewer_samples]))
    piqa = rows_of(board, "piqa")
    assert piqa["otherfp"].differs_from_base == ("fingerprint",)
    assert piqa["mc64"].differs_from_base == ("likelihood.mc_num",) and piqa["mc64"].base.name == "base"
    assert "! piqa static k=1 [4] (otherfp): differs from base (base) in fingerprint" in board.notes
    assert "! piqa static k=2 [4,6] (mc64): differs from base (base) in likelihood.mc_num" in board.notes
    assert compare(*runs, other_weights, fewer_samples) == 0
    out = capsys.readouterr().out
    flagged = [x for x in out.splitlines() if x.startswith("piqa") and "  !  " in x]
    assert len(flagged) == 2 and "in likelihood.mc_num" in out

    # A base evaluated with mc_num=64 as well: mc64 is compared with it and no longer flagged.
    base64 = write_run(root, "base64", {"method": "none"}, {"piqa": 0.64}, mc_num=64)
    piqa = rows_of(build_leaderboard(load_runs([*runs, fewer_samples, base64])), "piqa")
    assert piqa["mc64"].base.name == "base64" and piqa["mc64"].differs_from_base == ()
    assert piqa["mc64"].delta_points == pytest.approx(-4.0)


def test_task_without_base_and_other_models(runs, tmp_path):
    root = tmp_path / "more"
    arc = write_run(root, "arc", {"method": "static", "skip_layers": [4], "k": 1}, {"arc_challenge": 0.4})
    hf = write_run(root, "hf", {}, {"piqa": 0.72}, llada=False)
    board = build_leaderboard(load_runs([*runs, arc, hf]))
    arc_row = rows_of(board, "arc_challenge")["arc"]
    assert arc_row.delta_points is None and arc_row.base is None
    assert "arc_challenge: no base run (skip method none) among the runs; Δ vs base left empty" in board.notes
    hf_row = rows_of(board, "piqa")["hf"]
    assert hf_row.method == OTHER_MODEL and hf_row.normalized_flops("papers") == 1.0
    assert hf_row.base.name == "base" and "fingerprint" in hf_row.differs_from_base
    assert hf_row.delta_points == pytest.approx(2.0)
    assert any(n.startswith("hf: no config.dlmskip (model 'hf')") for n in board.notes)


def test_group_flops_pool_its_subtasks(tmp_path):
    run = write_run(tmp_path, "mmlu", {"method": "static", "skip_layers": [4], "k": 1},
                    {"mmlu": 0.6, "mmlu_a": 0.5, "mmlu_b": 0.7})
    path = next(run.rglob("results_*.json"))
    data = json.loads(path.read_text())
    data["group_subtasks"] = {"mmlu": ["mmlu_a", "mmlu_b"]}
    flops = data["config"]["dlmskip"]["flops"]
    del flops["mmlu"]
    flops["mmlu_b"].update(forwards=300, normalized_flops_papers=0.5, tflops=150.0, tflops_no_skip=300.0)
    path.write_text(json.dumps(data))
    board = build_leaderboard(load_runs([run]))
    assert [r.task for r in board.rows] == ["mmlu"]
    mmlu = board.rows[0]
    assert mmlu.normalized_flops("papers") == pytest.approx((0.96875 * 100 + 0.5 * 300) / 400)
    assert mmlu.normalized_flops("whole-model") == pytest.approx((0.96875 + 150.0) / 301.0)
    assert [r.task for r in build_leaderboard(load_runs([run]), tasks=["mmlu_b"]).rows] == ["mmlu_b"]
    with pytest.raises(ValueError, match="--tasks: hellaswag in no run"):
        build_leaderboard(load_runs([run]), tasks=["hellaswag"])


def test_plots_are_png_files(runs, tmp_path, capsys):
    out = tmp_path / "plots"
    assert compare(*runs, "--plot", out, "--flops", "whole-model") == 0
    names = {"accuracy_vs_flops_piqa.png", "accuracy_vs_flops_gsm8k_llada.png", "routed_block_execution.png"}
    assert {p.name for p in out.iterdir()} == names
    for name in names:
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_routed_runs_means_no_heatmap(runs, tmp_path, capsys):
    out = tmp_path / "plots"
    assert compare(*runs[:4], "--plot", out) == 0
    assert not (out / "routed_block_execution.png").exists()
    assert "routed_block_execution.png not written" in capsys.readouterr().out


def test_run_names_tell_the_files_of_one_directory_apart(runs, tmp_path):
    names = [r.name for r in load_runs([tmp_path])]
    assert sorted(names) == sorted(f"{tmp_path.name}/{p.name}" for p in runs)
    write_run(tmp_path, "base", {"method": "none"}, {"piqa": 0.7}, date="2026-01-02T00-00-00.000000")
    assert [r.name for r in load_runs([tmp_path / "base"])] == [
        "base@2026-01-01T00-00-00.000000", "base@2026-01-02T00-00-00.000000",
    ]


def test_bad_runs_are_named(tmp_path):
    missing = tmp_path / "no_such_run"
    with pytest.raises(FileNotFoundError, match=f"RUN {missing}: no such file or directory"):
        compare(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no results_.*json below it"):
        compare(tmp_path / "empty")
    broken = tmp_path / "broken" / "results_2026.json"
    broken.parent.mkdir()
    broken.write_text('{"results": {')
    with pytest.raises(ValueError, match=f"{broken}: malformed JSON"):
        compare(tmp_path / "broken")
    broken.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not an lm-eval results file"):
        compare(broken)


def test_outputs_in_the_way_are_refused_before_reading_runs(tmp_path, capsys):
    from lm_eval_dlmskip.cli import main

    taken = tmp_path / "taken"
    taken.write_text("")
    missing = tmp_path / "no_such_run"  # not read: the outputs are checked first
    assert main(["compare", str(missing), "--plot", str(taken)]) == 2
    assert f"--plot {taken} is a file; give a folder path" in capsys.readouterr().err
    assert main(["compare", str(missing), "--plot", str(taken / "plots")]) == 2
    assert f"{taken} is a file" in capsys.readouterr().err
    assert main(["compare", str(missing), "--markdown", str(tmp_path)]) == 2
    assert f"--markdown {tmp_path} is a folder" in capsys.readouterr().err


def test_families_share_one_leaderboard_each_against_its_own_base(runs, tmp_path, capsys):
    """The static paper's comparison: LLaDA, Dream and an autoregressive model, each model's skipped
    runs measured against that model's base (never another model's), retained accuracy beside Δ."""
    root = tmp_path / "families"
    dream = dict(pretrained="Dream-org/Dream-v0-Base-7B", family="dream", fingerprint="d")
    qwen = dict(pretrained="Qwen/Qwen2.5-7B", family="hf", fingerprint="q")
    more = [
        write_run(root, "dream-base", {"method": "none"}, {"piqa": 0.80}, **dream),
        write_run(root, "dream-k2", {"method": "static", "skip_layers": [4, 6], "k": 2}, {"piqa": 0.72}, **dream),
        write_run(root, "qwen-k2", {"method": "static", "skip_layers": [4, 6], "k": 2}, {"piqa": 0.40}, **qwen),
    ]
    board = build_leaderboard(load_runs([*runs, *more]), tasks=["piqa"])
    piqa = rows_of(board, "piqa")
    assert piqa["dream-k2"].base.name == "dream-base" and piqa["dream-k2"].differs_from_base == ()
    assert piqa["dream-k2"].delta_points == pytest.approx(-8.0) and piqa["dream-k2"].retained_pct == pytest.approx(90.0)
    assert piqa["static2"].base.name == "base" and piqa["static2"].retained_pct == pytest.approx(65 / 70 * 100)
    assert piqa["qwen-k2"].base is None and piqa["qwen-k2"].delta_points is None
    assert "piqa: no base run of Qwen/Qwen2.5-7B among the runs; its Δ vs base left empty" in board.notes
    models = [r.run.model for r in board.rows]
    assert models == sorted(models, key=[r.run.model for r in board.rows].index)  # each model's rows together
    assert compare(*runs, *more, "--tasks", "piqa", "--csv", tmp_path / "b.csv") == 0
    out = capsys.readouterr().out
    assert "dream: Dream-v0-Base-7B" in out and "llada: LLaDA-8B-Base" in out and "hf: Qwen2.5-7B" in out
    rows = {r["run"]: r for r in csv.DictReader((tmp_path / "b.csv").open(newline=""))}
    assert rows["dream-k2"]["model_family"] == "dream" and float(rows["dream-k2"]["retained_pct"]) == pytest.approx(90.0)


def test_retained_accuracy_is_plotted_per_model_when_several_models_ran(runs, tmp_path, capsys):
    """The static paper's Figure 1: one line per model through its base (100 %) and its skipped runs;
    a model without a base here has no retained figure to draw, and one model alone gets none."""
    from lm_eval_dlmskip.report.plots import retained_figure

    dream = dict(pretrained="Dream-org/Dream-v0-Base-7B", family="dream", fingerprint="d")
    more = [write_run(tmp_path / "f", "dream-base", {"method": "none"}, {"piqa": 0.80}, **dream),
            write_run(tmp_path / "f", "dream-k2", {"method": "static", "skip_layers": [4, 6], "k": 2}, {"piqa": 0.72},
                      **dream)]
    assert retained_figure(build_leaderboard(load_runs(runs)), "piqa") is None
    fig = retained_figure(build_leaderboard(load_runs([*runs, *more])), "piqa")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert lines["dream: Dream-v0-Base-7B"].get_xydata().flatten().tolist() == pytest.approx([1.0, 100.0, 0.9375, 90.0])
    llada = lines["llada: LLaDA-8B-Base"].get_xydata()
    assert len(llada) == 6 and llada[0].tolist() == [1.0, 100.0]
    assert compare(*runs, *more, "--plot", tmp_path / "plots") == 0
    assert (tmp_path / "plots" / "retained_vs_flops_piqa.png").exists()
