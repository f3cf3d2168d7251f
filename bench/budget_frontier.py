"""The routed frontier against static and random skipping, per task, on a model of
``bench/build_budget_model.py`` (issue 20): a Markdown table, a JSON of every number and a plot per task.

Per task T, under OUT/T/:
  1. ``dlmskip calibrate`` on T's training split (written as prompt/target JSONL): the static profile;
  2. static (b): every set of 1..K of the model's blocks evaluated in this process with lm-eval's
     ``simple_evaluate`` (cached in static_oracle.json, resumed), chosen on the test documents;
  3. ``dlmskip sweep``: base, the profile's static-k 1..K (static (a)), random k = 1..K;
  4. ``dlmskip sweep --routed-targets``: routers trained to each target, and a second series whose
     routers start from the profile (``--init-profile``), under OUT/T/sweep-init.
Then OUT/frontier.md, OUT/frontier.json and OUT/T/frontier_T.png. Every step resumes (the sweeps
key their runs; the in-process results are keyed too); a rerun with other settings is refused
rather than mixed in.

    python bench/budget_frontier.py --model-dir /work/budget/m1 --out /work/budget/frontier-cpu
    python bench/budget_frontier.py --model-dir M --out OUT --tasks budget_sort --train-args "--max-steps 100 ..."
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from lm_eval_dlmskip.common.files import check_output_dir, write_atomically, write_json
from lm_eval_dlmskip.report.frontier import (
    RoutedPoint,
    frontier_rows,
    markdown_table,
    static_envelope,
    upper_hull,
    verdicts,
)
from lm_eval_dlmskip.report.leaderboard import build_leaderboard, choose_metric, load_runs, metric_keys

TASKS = "budget_reverse,budget_sort,budget_compare,budget_add"
TRAIN_ARGS = "--max-steps 300 --lr 1e-3 --effective-batch-size 64 --batch-size 64 --dtype float32"
LM_EVAL_ARGS = "--device cpu --batch_size 32"
SERIES = {"sweep": "routed", "sweep-init": "routed from profile"}
MC_SEED = 1234  # dlmskip sweep's default mask seed, passed to the in-process runs too
DLMSKIP = [sys.executable, "-m", "lm_eval_dlmskip.cli"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = parser.add_argument
    a("--model-dir", required=True, help="folder of build_budget_model.py: model/ and tasks/")
    a("--out", required=True, help="folder for every run, the table and the plots (resumed when it exists)")
    a("--tasks", default=TASKS, help=f"tasks, comma-separated (default {TASKS})")
    a("--targets", default="0.9,0.8,0.7", help="routed execution ratios")
    a("--max-k", type=int, default=3, help="static and random runs skip 1..K blocks")
    a("--random-seeds", default="0,1,2", help="seeds of the random runs")
    a("--train-args", default=TRAIN_ARGS, help=f"dlmskip train options of the routers (default {TRAIN_ARGS!r})")
    a("--eval-model-args", help="extra model_args of every evaluation (lm-eval syntax, e.g. cache=dual,threshold=0.9), "
                                "also given to dlmskip train as --eval-model-args so that its routers calibrate on them")
    a("--calibrate-args", default="", help="extra dlmskip calibrate options (after ours: --threshold -1 --max-skip K "
                                           "--mask-fractions 1.0,0.5 --answer-length <the task's max_gen_toks>)")
    a("--lm-eval-args", help=f"lm_eval options of every evaluation (default {LM_EVAL_ARGS!r}, with --device's device); "
                             "the in-process runs take its --device, --batch_size and --limit")
    a("--device", help="device of calibrate, train and the evaluations (default: --lm-eval-args' --device, else cpu)")
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Every input checked before anything runs; fills args.model, args.task_dir, args.eval_options."""
    root = Path(args.model_dir)
    args.model, args.task_dir = root / "model", root / "tasks"
    if not (args.model / "config.json").exists() or not args.task_dir.is_dir():
        raise SystemExit(f"--model-dir {root}: no model/config.json or tasks/ below it; give the --out folder of "
                         "bench/build_budget_model.py")
    args.task_list = [t.strip() for t in args.tasks.split(",") if t.strip()]
    missing = [t for t in args.task_list if not (args.task_dir / f"{t}.yaml").exists()]
    if missing:
        have = sorted(p.stem for p in args.task_dir.glob("*.yaml"))
        raise SystemExit(f"--tasks: {', '.join(missing)} not in {args.task_dir} (it has {', '.join(have)})")
    try:
        targets = [float(t) for t in args.targets.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"--targets {args.targets!r}: give fractions of blocks executed, e.g. 0.9,0.8,0.7") from None
    if not targets or any(not 0 < t < 1 for t in targets):
        raise SystemExit(f"--targets {args.targets!r}: each must be in (0, 1), e.g. 0.9,0.8,0.7")
    if args.max_k < 1:
        raise SystemExit(f"--max-k {args.max_k}: give at least 1")
    for name in ("--init-profile", "--device", "--eval-model-args"):
        if name in shlex.split(args.train_args):
            raise SystemExit(f"--train-args sets {name}; this script sets it (--device, --eval-model-args; "
                             "--init-profile for the second series), leave it out")
    if args.lm_eval_args is None:
        args.lm_eval_args = LM_EVAL_ARGS.replace("--device cpu", f"--device {args.device or 'cpu'}")
    args.eval_options = eval_options(args.lm_eval_args)
    listed = args.eval_options.get("device")
    if args.device and listed and args.device != listed:
        raise SystemExit(f"--device {args.device} but --lm-eval-args has --device {listed}; give one of them")
    args.device = args.device or listed or "cpu"
    if not listed:
        args.lm_eval_args = f"{args.lm_eval_args} --device {args.device}".strip()
    args.eval_options["device"] = args.device
    check_output_dir(args.out, "--out")


def eval_options(text: str) -> dict:
    """--device, --batch_size and --limit of lm_eval's options, for the in-process runs; others refused."""
    parser = argparse.ArgumentParser(prog="--lm-eval-args", add_help=False, exit_on_error=False)
    parser.add_argument("--device")
    parser.add_argument("--batch_size", "--batch-size", default="1")
    parser.add_argument("--limit", type=float)
    try:
        known, rest = parser.parse_known_args(shlex.split(text))
    except argparse.ArgumentError as err:
        raise SystemExit(f"--lm-eval-args {text!r}: {err}") from None
    if rest:
        raise SystemExit(f"--lm-eval-args {text!r}: {' '.join(rest)} cannot be applied to the in-process static runs "
                         "too; give only --device, --batch_size and --limit")
    return {k: v for k, v in vars(known).items() if v is not None}


def run_command(cmd: list[str], log: list[str]) -> None:
    """Print, record and run a command; a failure stops the script (rerunning resumes)."""
    line = shlex.join(cmd)
    print(f"$ {line}", flush=True)
    log.append(line)
    done = subprocess.run(cmd)
    if done.returncode:
        raise SystemExit(f"failed with exit code {done.returncode}: {line}\nrerun this script to resume")


# ---- per task ------------------------------------------------------------------------------------


def training_jsonl(args: argparse.Namespace, task: str, path: Path) -> None:
    """The task's training split as lm-eval renders it (prompt and target), for calibrate's --data."""
    from lm_eval_dlmskip.data import task_texts

    texts, _ = task_texts(task, str(args.task_dir), split="train")
    lines = "".join(json.dumps({"prompt": p, "target": t}) + "\n" for p, t in texts)
    write_atomically(path, lambda tmp: tmp.write_text(lines))


def answer_length(args: argparse.Namespace, task: str) -> int:
    """The task's generation canvas (max_gen_toks), which calibrate measures after the prompt."""
    from lm_eval.tasks import TaskManager

    config = TaskManager(include_path=str(args.task_dir)).load(task)["tasks"][task].config
    return int((config.generation_kwargs or {}).get("max_gen_toks", 32))


def calibrate(args: argparse.Namespace, task: str, folder: Path, log: list[str]) -> Path:
    """The static profile of the task's training split; reused only if made by the same command."""
    data, profile, recorded = folder / "train.jsonl", folder / "profile.json", folder / "profile.command.json"
    cmd = [*DLMSKIP, "calibrate", "--model", str(args.model), "--data", str(data), "--output", str(profile),
           "--threshold", "-1", "--max-skip", str(args.max_k), "--mask-fractions", "1.0,0.5",
           "--answer-length", str(answer_length(args, task)), "--limit", "1000000", "--device", args.device,
           *shlex.split(args.calibrate_args)]
    if profile.exists():
        made_by = json.loads(recorded.read_text())["command"] if recorded.exists() else None
        if made_by != cmd[2:]:
            raise SystemExit(f"{profile} was made by another command ({made_by}); move {folder} away or give another --out")
        print(f"[{task}] profile {profile} made by the same command, reused", flush=True)
        log.append(shlex.join(cmd))
        return profile
    training_jsonl(args, task, data)
    run_command(cmd, log)
    write_json(recorded, {"command": cmd[2:]})
    return profile


def sweep_command(args: argparse.Namespace, task: str, out: Path, *extra: str) -> list[str]:
    return [*DLMSKIP, "sweep", "--model", str(args.model), "--tasks", task, "--include-path", str(args.task_dir),
            "--out", str(out), "--mc-seed", str(MC_SEED), "--lm-eval-args", args.lm_eval_args,
            *(["--model-args", args.eval_model_args] if args.eval_model_args else []), *extra]


def routed_train_args(args: argparse.Namespace, profile: Path | None) -> str:
    words = [*shlex.split(args.train_args), "--device", args.device]
    if args.eval_model_args:
        words += ["--eval-model-args", args.eval_model_args]
    if profile is not None:
        words += ["--init-profile", str(profile)]
    return shlex.join(words)


def oracle(args: argparse.Namespace, task: str, path: Path) -> dict[str, dict]:
    """Every set of 0..K blocks evaluated in this process: {"2,5": {"accuracy", "ratio"}}, cached in ``path``."""
    from lm_eval import simple_evaluate
    from lm_eval._cli.utils import key_val_to_dict
    from lm_eval.tasks import TaskManager

    extra = key_val_to_dict(args.eval_model_args) if args.eval_model_args else {}
    key = {"model": str(args.model), "task": task, "include_path": str(args.task_dir), "mc_seed": MC_SEED,
           "options": args.eval_options, **({"model_args": extra} if extra else {})}
    cache = json.loads(path.read_text()) if path.exists() else {"key": key, "results": {}}
    if cache["key"] != key:
        raise SystemExit(f"{path} holds results made with {cache['key']}, not {key}; move it away or give another --out")
    n_layers = json.loads((args.model / "config.json").read_text())["n_layers"]
    subsets = [c for k in range(args.max_k + 1) for c in itertools.combinations(range(n_layers), k)]
    manager = TaskManager(include_path=str(args.task_dir))
    options = {"device": args.eval_options["device"], "batch_size": args.eval_options.get("batch_size", 1),
               "limit": args.eval_options.get("limit")}
    for blocks in subsets:
        name = ",".join(map(str, blocks))
        if name in cache["results"]:
            continue
        model_args = {"pretrained": str(args.model), "mc_seed": MC_SEED, **extra,
                      **({"skip_layers": list(blocks)} if blocks else {})}
        result = simple_evaluate(model="llada_skip", model_args=model_args, tasks=[task], task_manager=manager,
                                 verbosity="WARNING", **options)
        scores = result["results"][task]
        metric = choose_metric(metric_keys(scores))
        flops = result["config"]["dlmskip"]["flops"][task]
        cache["results"][name] = {"accuracy": float(scores[metric]), "ratio": float(flops["normalized_flops_papers"]),
                                  "metric": metric}
        write_json(path, cache)
    return cache["results"]


def collect(task: str, folder: Path, n_layers: int, targets: list[float]) -> dict:
    """Every number of the task: base, static (a) and (b), random, the routed series; from the sweeps and the cache."""
    runs = load_runs([folder / name for name in SERIES if (folder / name).exists()])
    board = build_leaderboard(runs, tasks=[task])
    base = next(r for r in board.rows if r.family == "base" and folder / "sweep" in r.run.path.parents)
    profile = [{"blocks": r.run.skip.get("skip_layers"), "ratio": r.normalized_flops(), "accuracy": r.score}
               for r in board.rows if r.family == "static"]
    random: dict[int, list[dict]] = {}
    for r in board.rows:
        if r.family == "random":
            random.setdefault(int(r.run.skip["k"]), []).append({"seed": r.run.skip.get("seed"), "ratio": r.normalized_flops(),
                                                                "accuracy": r.score})
    routed = []
    for r in board.rows:
        target = r.run.skip.get("target_ratio") if r.family == "routed" else None
        series = next((s for name, s in SERIES.items() if folder / name in r.run.path.parents), None)
        if target is not None and series is not None and any(abs(target - t) < 1e-9 for t in targets):
            routed.append(RoutedPoint(series, float(target), r.normalized_flops(), r.score))
    subsets = json.loads((folder / "static_oracle.json").read_text())["results"]
    best = {}
    for name, v in subsets.items():
        k = len(name.split(",")) if name else 0
        if k and (k not in best or v["accuracy"] > best[k]["accuracy"]):
            best[k] = {"blocks": [int(b) for b in name.split(",")], **v}
    return {"metric": board.metrics[task], "n_layers": n_layers, "base": {"ratio": base.normalized_flops(), "accuracy": base.score},
            "base_in_process": subsets.get(""), "profile": profile, "oracle_best": best, "oracle_all": subsets,
            "random": random, "routed": [vars(p) for p in sorted(routed, key=lambda p: (p.series, -p.target))]}


def task_rows(data: dict):
    """The frontier rows of a task's collected numbers."""
    base = (data["base"]["ratio"], data["base"]["accuracy"])
    profile = [base, *((p["ratio"], p["accuracy"]) for p in data["profile"])]
    oracle = [base, *((v["ratio"], v["accuracy"]) for v in data["oracle_all"].values())]
    random = {k: sum(r["accuracy"] for r in runs) / len(runs) for k, runs in data["random"].items()}
    return frontier_rows([RoutedPoint(**p) for p in data["routed"]], profile, oracle, {int(k): v for k, v in random.items()},
                         data["n_layers"]), profile, oracle


def longest_timings(path: Path, timings: dict[str, float]) -> dict[str, float]:
    """Per phase the longest wall time of any call so far (a resumed call reuses finished work and
    takes seconds), kept in ``path``: what a phase costs, for planning a run."""
    earlier = json.loads(path.read_text()) if path.exists() else {}
    longest = {phase: max(sec, earlier.get(phase, 0.0)) for phase, sec in timings.items()}
    write_json(path, longest)
    return longest


def plot(task: str, data: dict, path: Path) -> None:
    """Accuracy vs the papers' normalized FLOPs: routed series as lines, static points and envelopes, random points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, profile, oracle = task_rows(data)
    fig, ax = plt.subplots(figsize=(10, 5))
    every = list(data["oracle_all"].values())
    ax.scatter([v["ratio"] for v in every], [100 * v["accuracy"] for v in every], s=10, color="0.75",
               label="static (b): every set of 1..K blocks (test documents)", zorder=1)
    lowest = min(x for x, _ in upper_hull(oracle + profile))
    grid = [lowest + (1 - lowest) * i / 200 for i in range(201)]
    for points, style, label in ((oracle, "C0--", "static (b) envelope (oracle)"), (profile, "C9:", "static (a) envelope")):
        xs = [x for x in grid if static_envelope(points, x) is not None]
        ax.plot(xs, [100 * static_envelope(points, x) for x in xs], style, label=label, zorder=2)
    ax.scatter([p["ratio"] for p in data["profile"]], [100 * p["accuracy"] for p in data["profile"]], marker="o",
               facecolors="none", edgecolors="C9", s=60, label="static (a): the profile's k = 1..K (training data)", zorder=3)
    for k, runs in data["random"].items():
        ax.scatter([r["ratio"] for r in runs], [100 * r["accuracy"] for r in runs], marker="s", color="C1", s=18,
                   label="random k blocks (per seed)" if k == min(data["random"]) else None, zorder=3)
    for i, series in enumerate(dict.fromkeys(r.point.series for r in rows)):
        mine = sorted((r.point for r in rows if r.point.series == series), key=lambda p: p.ratio)
        ax.plot([p.ratio for p in mine], [100 * p.accuracy for p in mine], ["C2^-", "C3v-"][i % 2], label=series, zorder=4)
        for p in mine:
            ax.annotate(f"R={p.target:g}", (p.ratio, 100 * p.accuracy), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.scatter([data["base"]["ratio"]], [100 * data["base"]["accuracy"]], marker="*", s=150, color="black", label="base", zorder=5)
    ax.set_xlabel("normalized FLOPs, papers' figure (executed blocks / all blocks)")
    ax.set_ylabel(f"accuracy % ({data['metric']})")
    ax.set_title(task)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


# ---- the report --------------------------------------------------------------------------------


def task_markdown(task: str, data: dict, timings: dict) -> str:
    rows, _, _ = task_rows(data)
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    lines = [f"## {task}", "", f"![accuracy vs FLOPs]({task}/frontier_{task}.png)", "",
             f"Metric {data['metric']}. Base (full depth): {pct(data['base']['accuracy'])} % at {data['base']['ratio']:.4f}."]
    check = data.get("base_in_process")
    if check is not None and abs(check["accuracy"] - data["base"]["accuracy"]) > 1e-9:
        lines.append(f"**The in-process base ({pct(check['accuracy'])} %) differs from the sweep's: static (b) is not "
                     "comparable.**")
    lines += ["", "| static set | chosen on | k | blocks (0-based) | ratio | acc % |", "|---|---|---:|---|---:|---:|"]
    for p in sorted(data["profile"], key=lambda p: -p["ratio"]):
        lines.append(f"| (a) profile | training split | {len(p['blocks'])} | {p['blocks']} | {p['ratio']:.4f} | {pct(p['accuracy'])} |")
    for k, v in sorted(data["oracle_best"].items()):
        lines.append(f"| (b) best of all {sum(1 for n in data['oracle_all'] if n and len(n.split(',')) == k)} | test documents "
                     f"(oracle) | {k} | {v['blocks']} | {v['ratio']:.4f} | {pct(v['accuracy'])} |")
    for k, runs in sorted(data["random"].items()):
        accs = ", ".join(pct(r["accuracy"]) for r in runs)
        lines.append(f"| random (seeds {', '.join(str(r['seed']) for r in runs)}) | — | {k} | — | "
                     f"{sum(r['ratio'] for r in runs) / len(runs):.4f} | mean {pct(sum(r['accuracy'] for r in runs) / len(runs))} ({accs}) |")
    lines += ["", markdown_table(rows)]
    for static, name in (("profile", "(a)"), ("oracle", "(b)")):
        for series, v in verdicts(rows, static).items():
            lines.append(f"- {series} vs static {name}: targets within 0.02: {'yes' if v['on_budget'] else 'no'}; "
                         f"≥ static − 1 pt everywhere: {'yes' if v['holds'] else 'no'}; strictly better on {v['better']} of "
                         f"{v['points']}; **done: {'yes' if v['done'] else 'no'}**")
    lines += ["", "Longest wall time of a call, per phase: " + ", ".join(f"{phase} {sec:.0f} s" for phase, sec in timings.items()), ""]
    return "\n".join(lines)


def report(args: argparse.Namespace, argv: list[str], sections: list[str], commands: list[str]) -> str:
    head = [
        "# Routed frontier against static and random skipping", "",
        f"Model {args.model}, tasks {args.task_dir}; written {datetime.datetime.now().isoformat(timespec='seconds')} by",
        "", "```bash", shlex.join(["python", "bench/budget_frontier.py", *argv]), "```", "",
        "How to read it. FLOPs are the papers' normalized figure (executed blocks / all blocks), as lm_eval's "
        "results record it (`config.dlmskip.flops.<task>.normalized_flops_papers`). Static (a): the first k blocks of "
        "`dlmskip calibrate` on the task's **training split** (a method a user can run). Static (b): the best set of k "
        "blocks among all subsets, **chosen on the test documents it is scored on**: an oracle ceiling for static "
        "skipping, not a method. The envelope of a static kind at ratio x is the upper concave hull of its points (base "
        "at 1.0 included) at x, never below a cheaper point: two static sets time-share the documents to reach any "
        "point between them. Random: k blocks drawn per forward, mean over seeds, at the k nearest the routed point's "
        "ratio. Verdicts: routed ≥ envelope − 1 point, routed > envelope; n/a where the routed ratio lies below every "
        "static point. Done (issue 20): every target within 0.02, ≥ envelope − 1 pt everywhere, strictly better on at "
        "least half.", "",
    ]
    tail = ["## Commands", "", "Run by the script (the in-process static (b) runs are `lm_eval.simple_evaluate(model="
            "\"llada_skip\", model_args={pretrained, mc_seed, skip_layers, --eval-model-args}, tasks=[T], ...)` with --lm-eval-args' device, "
            "batch size and limit):", "", "```bash", *commands, "```", ""]
    return "\n".join(head + sections + tail)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    out = Path(args.out)
    n_layers = json.loads((args.model / "config.json").read_text())["n_layers"]
    targets = [float(t) for t in args.targets.split(",") if t.strip()]
    ks = ",".join(str(k) for k in range(1, args.max_k + 1))
    sections, commands, everything = [], [], {}
    for task in args.task_list:
        folder, timings = out / task, {}
        folder.mkdir(parents=True, exist_ok=True)
        tic = time.time()
        profile = calibrate(args, task, folder, commands)
        timings["calibrate"] = time.time() - tic
        tic = time.time()
        print(f"[{task}] static (b): every set of 0..{args.max_k} of {n_layers} blocks, in this process", flush=True)
        oracle(args, task, folder / "static_oracle.json")
        timings["static (b) in-process"] = time.time() - tic
        phases = [
            ("sweep base + static (a) + random", sweep_command(
                args, task, folder / "sweep", "--skip-profile", str(profile), "--static-k", str(args.max_k),
                "--random-k", ks, "--random-seeds", args.random_seeds)),
            ("sweep routed (train + eval)", sweep_command(
                args, task, folder / "sweep", "--routed-targets", args.targets, "--train-task", task,
                "--train-args", routed_train_args(args, None))),
            ("sweep routed from profile (train + eval)", sweep_command(
                args, task, folder / "sweep-init", "--routed-targets", args.targets, "--train-task", task,
                "--train-args", routed_train_args(args, profile))),
        ]
        for phase, cmd in phases:
            tic = time.time()
            run_command(cmd, commands)
            timings[phase] = time.time() - tic
        timings = longest_timings(folder / "timings.json", timings)
        data = collect(task, folder, n_layers, targets)
        data["timings_s"] = timings
        plot(task, data, folder / f"frontier_{task}.png")
        sections.append(task_markdown(task, data, timings))
        everything[task] = data
    write_json(out / "frontier.json", {"argv": argv, "commands": commands, "tasks": everything})
    text = report(args, argv, sections, commands)
    write_atomically(out / "frontier.md", lambda tmp: tmp.write_text(text))
    print(f"written {out / 'frontier.md'}, {out / 'frontier.json'} and a plot per task")
    return 0


if __name__ == "__main__":
    sys.exit(main())
