"""Skipping under cached and parallel decoding on the trained demo model: a Markdown table from real runs.

Runs ``python -m lm_eval --model llada_skip`` on ``demo_reverse_gen`` ``--repeat`` times per cell of
the grid cache (none, prefix, dual) x threshold (unset = fixed schedule, then each of ``--thresholds``)
x skipping (none; static: the calibrated profile; routed with decisions per block, and routed asked
at every step when there is a cache), plus random skipping of as many blocks as the profile with
cache=dual. Each cell gets its own ``--output_path`` under ``--runs``; runs already recorded there
are read, not repeated. Each run gets ``--threads`` torch threads (default 1). Per cell: the task's
metric, NFE per request, tokens computed per forward, the three normalized FLOPs from
``results["config"]["dlmskip"]["flops"]``, the seconds of decoding alone (requests over the rate
lm_eval's generate_until progress bar shows: tqdm's smoothed rate, roughly) and the wall and CPU
seconds of the whole lm_eval process (start-up included), each the least over the ``--repeat`` runs.

    python -m lm_eval_dlmskip.cli demo --out /tmp/h4demo     # then calibrate and train as docs/demo/README.md
    PYTHONPATH=. python bench/cached_demo_table.py --demo /tmp/h4demo --profile /tmp/h4demo/prof.json \
        --router /tmp/h4demo/rdemo --runs /tmp/h4runs --markdown table.md
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

TASK = "demo_reverse_gen"
FLOPS_KEYS = ("nfe_per_request", "tokens_per_forward", "normalized_flops_papers",
              "normalized_flops_whole_model", "normalized_flops_vs_plain_decoding")


def grid(thresholds: list[str], profile: str, router: str, random_k: int) -> list[tuple[str, str, str, str]]:
    """(cache, threshold or '', skipping label, its model_args) for every run."""
    skips = {"none": "", "static": f"skip_profile={profile}",
             "routed/block": f"router={router},decide_every=block", "routed/step": f"router={router},decide_every=step",
             f"random {random_k}": f"skip_random={random_k},seed=0"}
    runs = []
    for cache in ("none", "prefix", "dual"):
        for threshold in ["", *thresholds]:
            for label, args in skips.items():
                if (label == "routed/step" and cache == "none") or (label.startswith("random") and cache != "dual"):
                    continue
                if cache == "none" and label == "routed/block":
                    label, args = "routed", f"router={router}"
                runs.append((cache, threshold, label, args))
    return runs


def run_one(python: str, demo: Path, settings: str, cache: str, threshold: str, skip_args: str,
            out: Path, batch_size: int, repeat: int, threads: int) -> dict:
    """Run lm_eval until ``out`` holds ``repeat`` timed runs; the row's numbers, the fastest timings."""
    model_args = ",".join(a for a in (f"pretrained={demo / 'llada-demo'}", settings, f"cache={cache}",
                                      f"threshold={threshold}" if threshold else "", skip_args) if a)
    timing = out / "timing.json"
    runs = json.loads(timing.read_text())["runs"] if timing.exists() else []
    while len(runs) < repeat:
        command = [python, "-m", "lm_eval", "--model", "llada_skip", "--model_args", model_args, "--tasks", TASK,
                   "--include_path", str(demo / "tasks"), "--device", "cpu", "--batch_size", str(batch_size),
                   "--output_path", str(out)]
        print("$", " ".join(command), flush=True)
        out.mkdir(parents=True, exist_ok=True)
        before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        with (out / "log.txt").open("w") as log:  # lm_eval's table and log; see it when a run fails
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT,
                           env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
        # decoding alone: requests / rate of lm_eval's progress bar (tqdm's smoothed rate, not a stopwatch)
        n, rate, unit = re.findall(r"generate_until: 100%.*? (\d+)/\d+ \[.*?, *([\d.]+)(it/s|s/it)\]",
                                   (out / "log.txt").read_text())[-1]
        runs.append({"wall_s": wall, "cpu_s": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
                     "decode_s": int(n) / float(rate) if unit == "it/s" else int(n) * float(rate)})
        timing.write_text(json.dumps({"model_args": model_args, "runs": runs}))
    results = json.loads(Path(sorted(glob.glob(str(out / "*" / "results_*.json")))[-1]).read_text())
    metrics = results["results"][TASK]
    metric = next(k for k in metrics if "," in k and "_stderr" not in k)
    flops = results["config"]["dlmskip"]["flops"][TASK]
    return {"metric": metric, "accuracy": metrics[metric], **{k: flops[k] for k in FLOPS_KEYS},
            **{k: min(r[k] for r in runs) for k in ("decode_s", "wall_s", "cpu_s")}}


def markdown(rows: list[tuple[str, str, str, dict]]) -> str:
    head = ("| cache | threshold | skipping | accuracy | NFE / request | tokens / forward | FLOPs papers "
            "| FLOPs whole model | FLOPs vs plain | decode s | wall s | CPU s |")
    lines = [head, "|" + "---|" * 3 + "---:|" * 9]
    for cache, threshold, label, r in rows:
        lines.append(f"| {cache} | {threshold or 'unset'} | {label} | {r['accuracy']:.3f} | {r['nfe_per_request']:.2f} "
                     f"| {r['tokens_per_forward']:.2f} | {r['normalized_flops_papers']:.3f} "
                     f"| {r['normalized_flops_whole_model']:.3f} | {r['normalized_flops_vs_plain_decoding']:.3f} "
                     f"| {r['decode_s']:.2f} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", type=Path, required=True, help="the directory `dlmskip demo --out` wrote")
    parser.add_argument("--profile", required=True, help="skip profile from `dlmskip calibrate`")
    parser.add_argument("--router", required=True, help="router checkpoint from `dlmskip train`")
    parser.add_argument("--runs", type=Path, required=True, help="one lm_eval output folder per run under here")
    parser.add_argument("--markdown", type=Path, required=True)
    parser.add_argument("--settings", default="gen_length=8,block_length=4,steps=8", help="decoding model_args")
    parser.add_argument("--thresholds", default="0.9,0.5", help="besides unset (the fixed schedule)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per cell; the table keeps the fastest")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of each run: on a shared CPU two threads of this tiny model can spin "
                             "for seconds per forward while another process holds a core")
    args = parser.parse_args(argv)
    random_k = len(json.loads(Path(args.profile).read_text())["skip_layers"])
    rows = []
    for cache, threshold, label, skip_args in grid(args.thresholds.split(","), args.profile, args.router, random_k):
        name = f"{cache}_t{threshold or 'unset'}_{label.replace('/', '-').replace(' ', '')}"
        rows.append((cache, threshold, label, run_one(sys.executable, args.demo, args.settings, cache, threshold,
                                                      skip_args, args.runs / name, args.batch_size,
                                                      args.repeat, args.threads)))
        args.markdown.write_text(markdown(rows))  # a partial table survives an interrupted grid
    print(markdown(rows))


if __name__ == "__main__":
    main()
