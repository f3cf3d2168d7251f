"""Every figure of docs/demo/ and of the README's demo passages, from the commands the documents show.

    python docs/demo/make_docs.py --work /tmp/dlmskip-docs      # runs everything: ~30 min on 2 busy CPU cores
    python docs/demo/make_docs.py --render-only                 # documents from the committed results.json

Each command runs as the documents print it (``dlmskip ...``, ``lm_eval ...``), in ``--work``, with
this checkout first on PYTHONPATH and ``OMP_NUM_THREADS=--threads``. What it measured goes into
``docs/demo/results.json`` beside the commands; the documents are then rendered from
``docs/demo/templates/`` (Jinja) and that file alone, and the figures and ``leaderboard.md`` copied
from the commands' outputs. A command recorded in ``--work`` with the same text and a zero exit
status is not run again (delete the folder, or pass ``--rerun``, for a fresh run).
``tests/test_docs.py`` checks that the committed documents are this rendering of results.json and
that every command they show is one this script runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent.parent
RESULTS = DOCS / "results.json"
TEMPLATES = DOCS / "templates"
DEMO = "dlmskip-demo"
LLADA = f"{DEMO}/llada-demo"
TASKS = f"{DEMO}/tasks"
BOTH = "demo_reverse_mc,demo_reverse_gen"
TRAIN = ["--task", "demo_reverse_gen", "--include-path", TASKS]
SMALL_MODEL_RECIPE = ["--batch-size", "8", "--effective-batch-size", "16", "--lr", "1e-2", "--warmup-steps", "5",
                      "--router-hidden", "32", "--dtype", "float32"]
ROUTER_RECIPE = ["--lambda", "1.0", *SMALL_MODEL_RECIPE]
BUDGET = "0.7"  # the README's --target-ratio example
CALIBRATION = ["--mask-fractions", "1.0,0.5", "--answer-length", "5", "--threshold", "0.5", "--max-skip", "3"]
CACHED_DECODING = "gen_length=8,block_length=4,steps=8"
THRESHOLDS = ("", "0.9", "0.5")  # "": the fixed schedule


def train(name: str, steps: int) -> list[str]:
    return ["dlmskip", "train", "--model", LLADA, *TRAIN, "--output", f"{DEMO}/routers/{name}",
            "--max-steps", str(steps), *ROUTER_RECIPE]


def cached_grid() -> list[tuple[str, dict, list[str]]]:
    """cached.md's rows: (name, its labels, the lm_eval command) for cache x threshold x skipping."""
    router = f"{DEMO}/routers/rdemo"
    skips = {"none": "", "static": f"skip_profile={DEMO}/profile.json",
             "routed/block": f"router={router},decide_every=block", "routed/step": f"router={router},decide_every=step",
             "random 3": "skip_random=3,seed=0"}
    rows = []
    for cache in ("none", "prefix", "dual"):
        for threshold in THRESHOLDS:
            for label, skip in skips.items():
                if (label == "routed/step" and cache == "none") or (label.startswith("random") and cache != "dual"):
                    continue
                if cache == "none" and label == "routed/block":
                    label, skip = "routed", f"router={router}"
                args = ",".join(a for a in (f"pretrained={LLADA}", CACHED_DECODING, f"cache={cache}",
                                            f"threshold={threshold}" if threshold else "", skip) if a)
                name = f"{cache}_t{threshold or 'unset'}_{label.replace('/', '-').replace(' ', '')}"
                rows.append((name, {"cache": cache, "threshold": threshold or "unset", "skipping": label},
                             ["lm_eval", "--model", "llada_skip", "--model_args", args, "--tasks", "demo_reverse_gen",
                              "--include_path", TASKS, "--device", "cpu", "--batch_size", "8",
                              "--output_path", f"{DEMO}/cached/{name}"]))
    return rows


def commands() -> list[tuple[str, list[str]]]:
    """(name, argv) of every command, in the order they run; the documents show these and no others."""
    steps = [
        ("demo", ["dlmskip", "demo"]),
        ("calibrate", ["dlmskip", "calibrate", "--model", LLADA, *TRAIN, "--output", f"{DEMO}/profile.json",
                       *CALIBRATION]),
        ("train_rdemo", train("rdemo", 100)),
        ("train_r1", train("r1", 60)),
        ("routed", ["lm_eval", "--model", "llada_skip", "--model_args",
                    f"pretrained={LLADA},router={DEMO}/routers/rdemo,mc_num=8", "--tasks", BOTH,
                    "--include_path", TASKS, "--batch_size", "8", "--output_path", f"{DEMO}/results/routed"]),
        ("train_budget", ["dlmskip", "train", "--model", LLADA, *TRAIN, "--output", f"{DEMO}/routers/r70",
                          "--target-ratio", BUDGET, "--max-steps", "100", *SMALL_MODEL_RECIPE]),
        ("budget", ["lm_eval", "--model", "llada_skip", "--model_args",
                    f"pretrained={LLADA},router={DEMO}/routers/r70,mc_num=8", "--tasks", BOTH,
                    "--include_path", TASKS, "--batch_size", "8", "--output_path", f"{DEMO}/results/budget"]),
        ("check", ["dlmskip", "check", "--model", "llada_skip", "--model_args", f"pretrained={LLADA},steps=10",
                   "--tasks", BOTH, "--include_path", TASKS]),
        ("sweep", ["dlmskip", "sweep", "--model", LLADA, "--tasks", BOTH, "--include-path", TASKS,
                   "--out", f"{DEMO}/sw", "--skip-profile", f"{DEMO}/profile.json", "--static-k", "3",
                   "--random-k", "1,3", "--routers", f"{DEMO}/routers/r1", f"{DEMO}/routers/rdemo",
                   "--model-args", "mc_num=8", "--lm-eval-args", "--device cpu --batch_size 8"]),
        ("compare", ["dlmskip", "compare", f"{DEMO}/sw", "--markdown", "leaderboard.md", "--plot", "."]),
        ("analyze", ["dlmskip", "analyze", "--model", LLADA, *TRAIN, "--out", ".", "--gen-length", "5", *CALIBRATION]),
    ]
    steps += [(f"cached/{name}", argv) for name, _, argv in cached_grid()]
    for family, model, extra in (("dream", "dream_skip", ",mc_num=8"), ("llama", "hf_skip", "")):
        steps += [
            (f"demo_{family}", ["dlmskip", "demo", "--family", family]),
            (f"{family}_skip", ["lm_eval", "--model", model, "--model_args",
                                f"pretrained={DEMO}/{family}-demo,skip_layers=[5]{extra}", "--tasks", BOTH,
                                "--include_path", TASKS, "--device", "cpu", "--batch_size", "8",
                                "--output_path", f"{DEMO}/results/{family}-skip5"]),
        ]
    return steps


# ---------------------------------------------------------------------------------------------- running


def run_step(name: str, argv: list[str], work: Path, threads: int) -> dict:
    """Run one command in ``work``; its log under ``work/logs``; wall and CPU seconds, and for lm_eval
    the seconds of decoding alone (requests over the rate of its generate_until progress bar)."""
    log = work / "logs" / f"{name.replace('/', '_')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(argv, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    record = {"command": shlex.join(argv), "returncode": done.returncode, "wall_s": round(wall, 2),
              "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 2)}
    bars = re.findall(r"generate_until: 100%.*? (\d+)/\d+ \[.*?, *([\d.]+)(it/s|s/it)\]", log.read_text())
    if bars:
        n, rate, unit = bars[-1]
        record["decode_s"] = round(int(n) / float(rate) if unit == "it/s" else int(n) * float(rate), 3)
    return record


def run_all(work: Path, threads: int, rerun: bool) -> dict:
    """Run every command not yet recorded in ``work/records.json`` with the same text; stop at the
    first failure (its log is named)."""
    work.mkdir(parents=True, exist_ok=True)
    records_file = work / "records.json"
    records = json.loads(records_file.read_text()) if records_file.exists() and not rerun else {}
    for name, argv in commands():
        old = records.get(name)
        if old and old["command"] == shlex.join(argv) and old["returncode"] == 0:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {shlex.join(argv)}", flush=True)
        records[name] = run_step(name, argv, work, threads)
        records_file.write_text(json.dumps(records, indent=1))
        if records[name]["returncode"]:
            sys.exit(f"{name} failed (exit {records[name]['returncode']}); see {work / 'logs'}")
    return records



# ---------------------------------------------------------------------------------------------- collecting

FLOPS_KEYS = ("normalized_flops_papers", "normalized_flops_whole_model", "mean_executed_blocks", "forwards",
              "nfe_per_request", "tokens_per_forward", "normalized_flops_vs_plain_decoding")


def lm_eval_summary(output_path: Path) -> dict:
    """Per task of one lm_eval run (its newest results file): the metric, its value and stderr, the FLOPs."""
    files = sorted(output_path.glob("**/results_*.json"), key=lambda f: f.name)
    if not files:
        raise FileNotFoundError(f"no lm_eval results under {output_path}")
    results = json.loads(files[-1].read_text())
    summary = {}
    for task, metrics in results["results"].items():
        metric = next(k for k in metrics if "," in k and "_stderr" not in k)
        flops = results["config"]["dlmskip"]["flops"][task]
        summary[task] = {"metric": metric, "value": metrics[metric],
                         "stderr": metrics[metric.replace(",", "_stderr,", 1)],
                         **{k: flops[k] for k in (*FLOPS_KEYS, "block_execution_ratio") if k in flops}}
    return summary


def environment(threads: int) -> dict:
    import lm_eval
    import torch
    import transformers

    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
             if line.startswith("model name")] if info.exists() else []
    return {"date": time.strftime("%Y-%m-%d", time.gmtime()), "cpu": names[0] if names else platform.processor(),
            "cores": os.cpu_count(), "threads": threads,
            "python": platform.python_version(), "torch": torch.__version__, "lm_eval": lm_eval.__version__,
            "transformers": transformers.__version__}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def collect(work: Path, records: dict, threads: int) -> dict:
    """What the commands measured, read from the files they wrote in ``work``."""
    demo = work / DEMO
    values = {
        "demo": {run: lm_eval_summary(demo / "results" / run) for run in ("base", "skip")},
        "demo_checkpoint_sha256": {f.name: sha256(f) for f in sorted((work / LLADA).glob("*.safetensors"))},
        "calibrate": {k: json.loads((demo / "profile.json").read_text())[k]
                      for k in ("skip_layers", "paper_layers", "selection_order")},
        "train": {name: json.loads((demo / "routers" / name / "router.json").read_text())["metrics"]
                  for name in ("rdemo", "r1")},
        "routed": lm_eval_summary(demo / "results" / "routed"),
        "budget": {"router": json.loads((demo / "routers" / "r70" / "router.json").read_text())["budget"],
                   "run": lm_eval_summary(demo / "results" / "budget")},
        "sweep": {run.name: lm_eval_summary(run) for run in sorted((demo / "sw").iterdir()) if run.is_dir()},
        "cached": [{"name": name, **labels, **lm_eval_summary(demo / "cached" / name)["demo_reverse_gen"],
                    **{k: records[f"cached/{name}"][k] for k in ("wall_s", "cpu_s", "decode_s")}}
                   for name, labels, _ in cached_grid()],
    }
    for family in ("dream", "llama"):
        values[family] = {run: lm_eval_summary(demo / "results" / f"{family}-{run}") for run in ("base", "skip", "skip5")}
    figures = sorted(p.name for p in work.glob("*.png"))
    return {
        "generated_by": "docs/demo/make_docs.py; rerun it to regenerate, never edit by hand",
        "environment": environment(threads),
        "commands": records,
        "values": values,
        "outputs": {"leaderboard.md": (work / "leaderboard.md").read_text(),
                    "check": (work / "logs" / "check.log").read_text()},
        "figures": {name: sha256(work / name) for name in figures},
    }


# ---------------------------------------------------------------------------------------------- rendering

DOCUMENTS = ("README.md", "cached.md", "leaderboard.md")  # docs/demo/<name> from templates/<name>
README = ROOT / "README.md"
REGION = re.compile(r"(<!-- make_docs: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /make_docs: (?P=name) -->)", re.S)


def shell(command: str, width: int = 108) -> str:
    """A command as the documents print it: an option and its values stay on one line, lines
    continued with a backslash once they pass ``width``."""
    units: list[str] = []
    for token in shlex.split(command):
        option = token.startswith("--") and " " not in token  # "--device cpu": a value, though it starts with --
        if units and not option:
            units[-1] += " " + shlex.quote(token)
        else:
            units.append(shlex.quote(token))
    lines = [units[0]]
    for unit in units[1:]:
        if len(lines[-1]) + 1 + len(unit) > width:
            lines[-1] += " \\"
            lines.append("  " + unit)
        else:
            lines[-1] += " " + unit
    return "\n".join(lines)


def step_vs_block(rows: list[dict]) -> dict:
    """cached.md: routed decisions asked at every forward against once per block, over the cached rows."""
    by_name = {row["name"]: row for row in rows}
    pairs = [(row, by_name[row["name"].replace("routed-step", "routed-block")]) for row in rows
             if row["skipping"] == "routed/step"]
    changed = sum(step["value"] != block["value"] or step["normalized_flops_papers"] != block["normalized_flops_papers"]
                  for step, block in pairs)
    extra = [step["normalized_flops_whole_model"] - block["normalized_flops_whole_model"] for step, block in pairs]
    return {"rows": len(pairs), "changed": changed, "least": min(extra), "most": max(extra)}


def environment_for(results: dict):
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, autoescape=False)
    env.globals["shell"] = lambda name, width=108: shell(results["commands"][name]["command"], width)
    env.globals["cached_decoding"] = CACHED_DECODING
    env.globals["step_vs_block"] = step_vs_block
    env.filters["f"] = lambda x, digits=2: f"{x:.{digits}f}"
    env.filters["pct"] = lambda x: f"{100 * x:.0f}%"
    return env


def render(results: dict) -> dict[Path, str]:
    """Every generated document's text: docs/demo's from their templates, the README with each of
    its make_docs regions rendered from templates/README.<region>.md."""
    env = environment_for(results)
    out = {DOCS / name: env.get_template(name).render(r=results, v=results["values"]) for name in DOCUMENTS}
    out[README] = REGION.sub(lambda m: m.group(1) + env.get_template(f"README.{m.group('name')}.md").render(
        r=results, v=results["values"]) + m.group(4), README.read_text())
    return out


def write_documents(results: dict, work: Path | None) -> None:
    """The rendered documents, and the figures copied from ``work`` (when given)."""
    from lm_eval_dlmskip.common.files import write_atomically

    for path, text in render(results).items():
        write_atomically(path, lambda tmp, text=text: tmp.write_text(text))
    if work is not None:
        for name in results["figures"]:
            write_atomically(DOCS / name, lambda tmp, name=name: shutil.copyfile(work / name, tmp))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("dlmskip-docs-work"),
                        help="folder the commands run in (they write ./dlmskip-demo/ there)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every command")
    parser.add_argument("--rerun", action="store_true", help="run every command again, even those recorded")
    parser.add_argument("--render-only", action="store_true",
                        help="run nothing: render the documents from the committed results.json")
    args = parser.parse_args(argv)
    if args.render_only:
        write_documents(json.loads(RESULTS.read_text()), None)
        return 0
    work = args.work.resolve()
    records = run_all(work, args.threads, args.rerun)
    results = collect(work, records, args.threads)
    from lm_eval_dlmskip.common.files import write_atomically

    write_atomically(RESULTS, lambda tmp: tmp.write_text(json.dumps(results, indent=1) + "\n"))
    write_documents(results, work)
    print(f"wrote {RESULTS.relative_to(ROOT)}, the documents and {len(results['figures'])} figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
