"""``dlmskip sweep``: run a grid of skip configurations through lm-eval, in a layout ``compare`` reads.

Runs, each into ``OUT/<run>/`` with ``lm_eval --output_path``: ``base``; ``static-k<k>`` for k = 1..K
from a skip profile (its first k choices, ``skip_profile=..,skip_k=k``); ``random-k<k>-seed<s>``;
``routed-<name>`` for every router checkpoint; ``routed-target<R>`` for every ``--routed-targets`` R:
routers trained first by ``dlmskip train --target-ratio R`` (on ``--train-task``, with
``--train-args``) into ``OUT/routers/target<R>/``, then evaluated. Every run gets the same
``mc_seed``, so they all score with the same Monte-Carlo masks.

Each run is keyed by what it evaluates, not by its name: every model arg, with a profile's path
replaced by the blocks it selects and a router's path by a checksum of its weights and shape (a
router the sweep trains by its training recipe: model, task, target and training arguments), and
the tasks, ``--include-path`` and ``--lm-eval-args``. The key is written to ``OUT/<run>/sweep_run.json``
before lm-eval starts. A run whose folder holds results made under the same key is reused, so an
interrupted sweep resumes where it stopped; results made under another key (a recalibrated profile,
a retrained router, other settings) are never reused: the sweep refuses before running anything,
or with ``--rerun-stale`` deletes them and runs again. ``OUT/sweep.json`` lists the runs of every
call (a run of the same name is replaced). ``--dry-run`` prints the plan and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..common.files import check_output_dir, write_json
from ..skipping.profiles import profile_blocks, read_profile
from ..skipping.router_checkpoints import resolve_router, router_digest

KEY_FILE = "sweep_run.json"
TRAINED_KEY_FILE = "sweep_train.json"  # beside a router the sweep trained: the recipe it was trained with


@dataclass(frozen=True)
class Run:
    name: str
    model_args: dict  # as lm_eval gets them
    key: dict  # what the run evaluates; equal keys give equal results
    train: dict | None = None  # a router to train first: its recipe (train_key) and folder

    def command(self, args: argparse.Namespace, target: Path) -> list[str]:
        cmd = [sys.executable, "-m", "lm_eval", "--model", "llada_skip", "--model_args", json.dumps(self.model_args),
               "--tasks", args.tasks, "--output_path", str(target)]
        if args.include_path:
            cmd += ["--include_path", args.include_path]
        return cmd + shlex.split(args.lm_eval_args or "")


def plan_runs(args: argparse.Namespace) -> list[Run]:
    """Every configuration of the grid with its key; reads the profile and the routers' files,
    so a missing or wrong one is an error before any run."""
    # One mask seed for every run, so random runs (which vary `seed`) score with the base run's masks.
    base = {"pretrained": args.model, "mc_seed": args.mc_seed, **_parse_model_args(args.model_args)}
    runs = [("base", base)]
    if args.static_k:
        if not args.skip_profile:
            raise ValueError("--static-k needs --skip-profile PATH (from dlmskip calibrate)")
        chosen = len(read_profile(args.skip_profile)["selection_order"])
        if args.static_k > chosen:
            raise ValueError(f"--static-k {args.static_k}: the profile {args.skip_profile} chose {chosen} blocks; "
                             f"give at most {chosen} (or calibrate with a larger --max-skip)")
        runs += [(f"static-k{k}", {**base, "skip_profile": args.skip_profile, "skip_k": k}) for k in range(1, args.static_k + 1)]
    for k in _ints(args.random_k):
        runs += [(f"random-k{k}-seed{s}", {**base, "skip_random": k, "seed": s}) for s in _ints(args.random_seeds)]
    for router in args.routers or []:
        runs.append((f"routed-{Path(router).name}", {**base, "router": router}))
    recipes = {}
    for target in _targets(args.routed_targets):
        name, recipe = f"routed-target{target:g}", train_recipe(args, target)
        recipes[name] = recipe
        runs.append((name, {**base, "router": str(Path(args.out) / "routers" / f"target{target:g}")}))
    names = [name for name, _ in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"two runs would share a directory: {sorted(n for n in names if names.count(n) > 1)}")
    settings = {"tasks": args.tasks, "include_path": args.include_path, "lm_eval_args": shlex.split(args.lm_eval_args or "")}
    planned = []
    for name, model_args in runs:
        recipe = recipes.get(name)
        evaluated = _evaluated(model_args) if recipe is None else {**model_args, "router": {"trained": recipe}}
        train = None if recipe is None else {"recipe": recipe, "folder": model_args["router"]}
        planned.append(Run(name, model_args, {"model_args": evaluated, **settings}, train))
    return planned


def _targets(text: str | None) -> list[float]:
    """--routed-targets as numbers, each in (0, 1), none twice."""
    targets = [float(x) for x in str(text).split(",") if x.strip()] if text else []
    bad = [t for t in targets if not 0 < t < 1]
    if bad:
        raise ValueError(f"--routed-targets {text}: {bad[0]:g} is not in (0, 1); give fractions of blocks executed, e.g. 0.9,0.8,0.7")
    if len(set(targets)) != len(targets):
        raise ValueError(f"--routed-targets {text}: a target is given twice")
    return targets


def train_recipe(args: argparse.Namespace, target: float) -> dict:
    """What a router the sweep trains is made from: the model, the training task and folder, the
    target and every other ``dlmskip train`` argument (a change to any of them retrains it)."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    task = args.train_task or (tasks[0] if len(tasks) == 1 else None)
    if task is None:
        raise ValueError(f"--routed-targets: --tasks names {len(tasks)} tasks; say which one the routers train on "
                         "with --train-task NAME")
    train_args = shlex.split(args.train_args or "")
    taken = {"--model", "--task", "--data", "--include-path", "--output", "--target-ratio", "--lambda", "--alpha-target", "--resume"}
    clash = sorted(word for word in train_args if word.split("=")[0] in taken)
    if clash:
        raise ValueError(f"--train-args {args.train_args!r}: {clash[0].split('=')[0]} is set by the sweep (--model, "
                         "--train-task, --include-path, --routed-targets); give the other dlmskip train options only")
    return {"model": args.model, "task": task, "include_path": args.include_path, "target_ratio": target,
            "train_args": train_args}


def train_command(recipe: dict, folder: str, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "lm_eval_dlmskip.train", "--model", recipe["model"], "--task", recipe["task"],
           "--output", folder, "--target-ratio", str(recipe["target_ratio"])]
    if recipe["include_path"]:
        cmd += ["--include-path", recipe["include_path"]]
    return cmd + recipe["train_args"] + (["--resume"] if resume else [])


def trained_recipe(folder: Path) -> dict | None:
    """The recipe a router folder of the sweep was trained with (None: none recorded)."""
    try:
        return json.loads((folder.parent / f"{folder.name}.{TRAINED_KEY_FILE}").read_text())["recipe"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


def finished_router(folder: Path) -> bool:
    try:
        return json.loads((folder / "router.json").read_text())["training"]["finished"] is True
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return False


def _evaluated(model_args: dict) -> dict:
    """The model args with file paths replaced by what the files hold: a skip profile by the blocks
    it selects, a router directory by its weights' checksum and its shape (tau included)."""
    key = dict(model_args)
    if "skip_profile" in key:
        path = key.pop("skip_profile")
        key["skip_layers"] = profile_blocks(read_profile(path), path, key.pop("skip_k", None))
    if "router" in key:
        key["router"] = _router_key(key["router"])
    return key


def _router_key(router: str) -> dict:
    path = resolve_router(router)  # checks the checkpoint's two files
    meta_file = path / "router.json"
    weights = router_digest(path)
    return {"weights": weights, "shape": json.loads(meta_file.read_text()).get("router")}


def _ints(text: str | None) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()] if text else []


def _parse_model_args(text: str | None) -> dict:
    """Extra model_args in lm-eval's own syntax (``mc_num=128,cfg=0``)."""
    if not text:
        return {}
    from lm_eval._cli.utils import key_val_to_dict

    return key_val_to_dict(text)


def has_results(directory: Path) -> bool:
    return any(directory.rglob("results_*.json"))


def recorded_key(directory: Path) -> dict | None:
    """The key a run folder's results were made under (None: not recorded, e.g. by an older sweep)."""
    try:
        return json.loads((directory / KEY_FILE).read_text())["key"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


def key_changes(old: dict | None, new: dict) -> str:
    """What differs between two keys, for a message: ``skip_layers [6] -> [5]``."""
    if old is None:
        return f"its key was not recorded ({KEY_FILE} missing or unreadable)"
    flat_old = {**old.get("model_args", {}), **{k: v for k, v in old.items() if k != "model_args"}}
    flat_new = {**new["model_args"], **{k: v for k, v in new.items() if k != "model_args"}}
    return ", ".join(f"{k} {flat_old.get(k)!r} -> {flat_new.get(k)!r}"
                     for k in sorted(set(flat_old) | set(flat_new)) if flat_old.get(k) != flat_new.get(k))


def read_manifest(path: Path) -> list[dict]:
    """The runs ``sweep.json`` lists from earlier calls."""
    if not path.exists():
        return []
    try:
        return json.loads(path.read_text())["runs"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a sweep manifest ({err}); move it away or give another --out") from err


def merge_manifest(earlier: list[dict], current: list[dict]) -> list[dict]:
    """Earlier calls' runs in their order, a run of the same name replaced, new runs after them."""
    by_name = {entry["run"]: entry for entry in current}
    merged = [by_name.pop(entry["run"], entry) for entry in earlier]
    return merged + list(by_name.values())


def run_sweep(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_output_dir(out, "--out")
    runs = plan_runs(args)
    earlier = read_manifest(out / "sweep.json")
    stale = {run.name: key_changes(recorded_key(out / run.name), run.key) for run in runs
             if has_results(out / run.name) and recorded_key(out / run.name) != run.key}
    trained = {run.name: trained_recipe(Path(run.train["folder"])) for run in runs if run.train is not None}
    for run in runs:  # a router trained with another recipe (its results, if any, are stale above)
        if run.name not in trained or not Path(run.train["folder"]).exists() or run.name in stale:
            continue
        if trained[run.name] != run.train["recipe"]:
            stale[run.name] = "its router was trained with " + key_changes(
                None if trained[run.name] is None else {"model_args": trained[run.name]}, {"model_args": run.train["recipe"]})
    if stale and not args.rerun_stale:
        lines = "\n".join(f"  {name}: {change}" for name, change in stale.items())
        raise ValueError(f"results under {out} were made with other settings than this sweep's:\n{lines}\n"
                         "pass --rerun-stale to delete them and run these again, or give another --out")
    manifest, failed = [], []
    for run in runs:
        target = out / run.name
        cmd = run.command(args, target)
        manifest.append({"run": run.name, "model_args": run.model_args, "key": run.key, "command": shlex.join(cmd)})
        if has_results(target) and run.name not in stale:
            print(f"[{run.name}] results exist for the same settings, reused", flush=True)
            continue
        if run.name in stale:
            print(f"[{run.name}] {'would delete' if args.dry_run else 'deleting'} results made with other settings "
                  f"({stale[run.name]})", flush=True)
            if not args.dry_run:
                shutil.rmtree(target, ignore_errors=True)
                if run.train is not None:
                    _remove_trained(Path(run.train["folder"]))
        if run.train is not None and not _train_router(run, trained[run.name], args.dry_run):
            failed.append(run.name)
            continue
        print(f"[{run.name}] {shlex.join(cmd)}", flush=True)
        if args.dry_run:
            continue
        write_json(target / KEY_FILE, {"run": run.name, "key": run.key})  # before lm-eval writes results under it
        done = subprocess.run(cmd)
        if done.returncode:
            failed.append(run.name)
            print(f"[{run.name}] failed with exit code {done.returncode}", flush=True)
    if args.dry_run:
        print(f"dry run: {len(runs)} runs planned under {out}; nothing written")
        return 0
    write_json(out / "sweep.json", {"runs": merge_manifest(earlier, manifest)})
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}; rerun the same command to retry them")
        return 1
    print(f"sweep done: {len(runs)} runs under {out}; compare them with: dlmskip compare {out}")
    return 0


def _train_router(run: Run, recorded: dict | None, dry_run: bool) -> bool:
    """Train the run's router unless a finished one of the same recipe (``recorded``, read before
    any run) is there (an unfinished one is resumed); records the recipe beside it. False when
    training failed."""
    folder = Path(run.train["folder"])
    if finished_router(folder) and recorded == run.train["recipe"]:
        print(f"[{run.name}] router {folder} trained with the same recipe, reused", flush=True)
        return True
    cmd = train_command(run.train["recipe"], str(folder), resume=folder.exists())
    print(f"[{run.name}] {shlex.join(cmd)}", flush=True)
    if dry_run:
        return True
    write_json(folder.parent / f"{folder.name}.{TRAINED_KEY_FILE}", {"run": run.name, "recipe": run.train["recipe"]})
    done = subprocess.run(cmd)
    if done.returncode:
        print(f"[{run.name}] training failed with exit code {done.returncode}", flush=True)
    return done.returncode == 0


def _remove_trained(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    (folder.parent / f"{folder.name}.{TRAINED_KEY_FILE}").unlink(missing_ok=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model", required=True, help="LLaDA hub id or checkpoint directory")
    a("--tasks", required=True, help="lm-eval tasks, comma-separated")
    a("--out", required=True, help="directory for the runs (one subdirectory each)")
    a("--include-path", help="extra lm-eval task folder (e.g. tasks/)")
    a("--skip-profile", help="skip profile from dlmskip calibrate, for --static-k")
    a("--static-k", type=int, default=0, help="static runs with the profile's first 1..K blocks")
    a("--random-k", help="random-skip runs, e.g. 1,2,4")
    a("--random-seeds", default="0", help="seeds of the random runs, e.g. 0,1,2")
    a("--mc-seed", type=int, default=1234, help="Monte-Carlo mask seed, the same for every run")
    a("--routers", nargs="*", help="router checkpoint directories")
    a("--routed-targets", help="train routers to these execution ratios (dlmskip train --target-ratio) into OUT/routers/ "
                               "and evaluate them, e.g. 0.9,0.8,0.7")
    a("--train-task", help="the task the --routed-targets routers train on (default: the one task of --tasks)")
    a("--train-args", help='other dlmskip train options of those routers, e.g. "--max-steps 300 --lr 1e-3 --batch-size 8"')
    a("--model-args", help="extra model_args for every run, in lm-eval syntax (mc_num=128,cfg=0)")
    a("--lm-eval-args", help='extra lm_eval arguments, e.g. "--batch_size 8 --device cuda --limit 200"')
    a("--rerun-stale", action="store_true",
      help="delete results made with other settings (profile blocks, router weights, arguments) and run them again")
    a("--dry-run", action="store_true", help="print the commands only; write nothing")
