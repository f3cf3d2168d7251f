"""The leaderboard of skipping runs (``dlmskip compare``), like Table 1 of the router paper.

Each lm-eval results file (``results_*.json``, searched recursively under a RUN directory, or given
directly) is one run. Per (run, task) the leaderboard shows the skip method, the normalized FLOPs
(the papers' figure and the whole-model one, as ``skipping/flops.py`` defines them), the score with its
stderr, and the change against a base run (skip method none) of the same model and task, in points
and as the share of the base's score retained. Runs of several models (LLaDA, Dream, an
autoregressive model through ``hf_skip``) share one leaderboard, each measured against its own base:
the static paper's comparison of families. A base counts only if it was evaluated the same way
(``comparable_settings``); when none of the model's bases was, the row is compared with the model's
first base anyway and flagged ``!``, with a footnote naming the settings that differ. Seeds and skip
settings are not compared: they are what the runs are meant to vary.

A results file without ``config.dlmskip`` (another lm-eval model, e.g. ``--model hf``) is listed as
"base (other model)" with FLOPs 1.0; it never serves as the base, and its rows are flagged for the
llada_skip settings they lack. A group (e.g. ``mmlu``) stands for its subtasks, which are left out
unless asked for with ``--tasks``; its FLOPs are those of its subtasks together.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

# Automatic metric choice: the first present wins; a key ending in "," matches any filter.
PREFERRED_METRICS = (
    "acc,none", "exact_match,strict-match", "exact_match,flexible-extract", "exact_match,",
    "pass_at_1,none", "pass@1,none", "acc_norm,none",
)
FLOPS_KEYS = {"papers": "normalized_flops_papers", "whole-model": "normalized_flops_whole_model"}
OTHER_MODEL = "base (other model)"
_ABSENT = object()


@dataclass(frozen=True)
class Run:
    """One lm-eval results file; ``name`` is how the tables call it."""

    name: str
    path: Path
    data: dict

    @property
    def dlmskip(self) -> dict | None:
        return (self.data.get("config") or {}).get("dlmskip")

    @property
    def skip(self) -> dict:
        return (self.dlmskip or {}).get("skip") or {"method": "none"}

    @property
    def family(self) -> str:
        """base, static, random, routed (a skip method), or other (a file llada_skip did not write)."""
        if self.dlmskip is None:
            return "other"
        method = self.skip.get("method", "none")
        return "base" if method == "none" else method

    @property
    def label(self) -> str:
        return method_label(self.skip if self.dlmskip is not None else None)

    @property
    def model(self) -> str | None:
        """The checkpoint evaluated (``pretrained``), which a run's base must share."""
        if self.dlmskip is not None:
            return self.dlmskip.get("pretrained")
        args = (self.data.get("config") or {}).get("model_args")
        if isinstance(args, dict):
            return args.get("pretrained")
        pairs = (part.partition("=") for part in str(args or "").split(","))
        return next((value for key, _, value in pairs if key.strip() == "pretrained"), None)

    @property
    def model_family(self) -> str:
        """llada, dream or hf for our models' runs; lm-eval's model name for other files."""
        if self.dlmskip is not None:
            return self.dlmskip.get("family", "llada")
        return str((self.data.get("config") or {}).get("model"))

    @property
    def model_label(self) -> str:
        """``dream: Dream-v0-Base-7B``: the family and the checkpoint's last path component."""
        name = Path(self.model).name if self.model else "?"
        return f"{self.model_family}: {name}"


@dataclass(frozen=True)
class Row:
    """One (run, task) line of the leaderboard."""

    task: str
    run: Run
    metric: str | None
    score: float | None  # the metric's value as lm-eval reports it (0..1)
    stderr: float | None
    flops: dict | None  # the run's FLOPs statistics of this task; None if not recorded
    base: Run | None = None  # the run the delta is taken against
    delta_points: float | None = None  # (score - base score) * 100
    retained_pct: float | None = None  # score / base score * 100: accuracy retained
    differs_from_base: tuple[str, ...] = ()  # settings in which the run differs from its base

    @property
    def family(self) -> str:
        return self.run.family

    @property
    def method(self) -> str:
        return self.run.label

    def normalized_flops(self, figure: str = "papers") -> float | None:
        return _number((self.flops or {}).get(FLOPS_KEYS[figure]))

    def flops_change_pct(self, figure: str = "papers") -> float | None:
        """Compute saved against the same forwards without skipping: -3.125 for one block of 32."""
        flops = self.normalized_flops(figure)
        return None if flops is None else (flops - 1.0) * 100.0


@dataclass(frozen=True)
class Leaderboard:
    rows: list[Row]
    metrics: dict[str, str | None]  # task -> metric key shown (None: the task has none that fits)
    notes: list[str]  # footnotes: flagged bases, missing bases or metrics


def method_label(skip: dict | None) -> str:
    """The leaderboard's name of a skip setting (blocks 0-based): ``static k=3 [4,6,8]``."""
    if skip is None:
        return OTHER_MODEL
    method = skip.get("method", "none")
    if method == "none":
        return "base"
    if method == "static":
        layers = skip.get("skip_layers") or []
        return f"static k={skip.get('k', len(layers))} [{','.join(map(str, layers))}]"
    if method == "random":
        return f"random k={skip.get('k')}"
    if method == "routed":
        if skip.get("target_ratio") is not None:  # trained to a budget (dlmskip train --target-ratio)
            return f"routed R={short_number(skip['target_ratio'])} τ={short_number(skip.get('tau'))}"
        return f"routed λ={short_number(skip.get('lambda'))} τ={short_number(skip.get('tau'))}"
    return str(method)


# ---- reading runs ----------------------------------------------------------------------------


def find_results(run: str | Path) -> list[Path]:
    """The results files a RUN argument names: itself, or every results_*.json below it."""
    path = Path(run)
    if path.is_file():
        return [path]
    fix = "give lm-eval's --output_path directory or a results_*.json file"
    if not path.exists():
        raise FileNotFoundError(f"RUN {run}: no such file or directory; {fix}")
    files = sorted(path.rglob("results_*.json"))
    if not files:
        raise FileNotFoundError(f"RUN {run}: no results_*.json below it; {fix}")
    return files


def read_results(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: malformed JSON ({err}); re-run lm-eval or leave this file out") from err
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ValueError(f"{path}: not an lm-eval results file (no 'results' object); leave it out")
    return data


def load_runs(runs: list[str | Path]) -> list[Run]:
    """Every results file of the RUN arguments, in the order given (a directory's files by name, i.e. date)."""
    loaded: list[Run] = []
    seen: set[Path] = set()
    for run in runs:
        files = find_results(run)
        for name, file in zip(_run_names(run, files), files):
            if file.resolve() not in seen:
                seen.add(file.resolve())
                loaded.append(Run(name, file, read_results(file)))
    names = [r.name for r in loaded]
    return [r if names.count(r.name) == 1 else replace(r, name=str(r.path)) for r in loaded]


def _run_names(run: str | Path, files: list[Path]) -> list[str]:
    """The RUN's name, plus the folders that tell its files apart (and the date where they do not)."""
    path = Path(run)
    if path.is_file():
        return [str(run)]
    if len(files) == 1:
        return [path.resolve().name]
    folders = [f.relative_to(path).parent.parts for f in files]
    same_depth = len({len(parts) for parts in folders}) == 1
    keep = [i for i in range(max(map(len, folders))) if not same_depth or len({p[i] for p in folders}) > 1]
    names = ["/".join([path.resolve().name, *(p[i] for i in keep if i < len(p))]) for p in folders]
    return [n if names.count(n) == 1 else f"{n}@{f.stem.removeprefix('results_')}" for n, f in zip(names, files)]


# ---- what a run holds for a task -------------------------------------------------------------


def select_tasks(runs: list[Run], wanted: list[str] | None = None) -> list[str]:
    """The tasks asked for, else every task that is not inside a group (the group's row stands for it)."""
    present = list(dict.fromkeys(t for r in runs for t in r.data["results"]))
    if wanted:
        unknown = [t for t in wanted if t not in present]
        if unknown:
            raise ValueError(f"--tasks: {', '.join(unknown)} in no run; the runs hold {', '.join(sorted(present))}")
        return wanted
    inside = {c for r in runs for children in (r.data.get("group_subtasks") or {}).values() for c in children}
    return [t for t in present if t not in inside]


def metric_keys(scores: dict) -> list[str]:
    """A task's metric keys ("acc,none"), without stderrs and entries that are not numbers."""
    return [k for k, v in scores.items() if "," in k and "_stderr," not in k and _number(v) is not None]


def choose_metric(keys: list[str], requested: str | None = None) -> str | None:
    """``requested`` ("acc" means its "none" filter, else its first), or the first of PREFERRED_METRICS present."""
    if requested:
        if "," in requested:
            return requested if requested in keys else None
        if f"{requested},none" in keys:
            return f"{requested},none"
        return next((k for k in keys if k.startswith(f"{requested},")), None)
    for wanted in PREFERRED_METRICS:
        found = [k for k in keys if k.startswith(wanted)] if wanted.endswith(",") else [k for k in keys if k == wanted]
        if found:
            return found[0]
    return keys[0] if keys else None


def task_flops(run: Run, task: str) -> dict | None:
    """The run's FLOPs statistics of a task; a group's are its subtasks' together, weighted by forwards."""
    if run.dlmskip is None:
        return {FLOPS_KEYS["papers"]: 1.0, FLOPS_KEYS["whole-model"]: 1.0}
    per_task = run.dlmskip.get("flops") or {}
    if task in per_task:
        return per_task[task]
    parts = [per_task[t] for t in _leaves(task, run.data.get("group_subtasks") or {}) if t in per_task]
    forwards = sum(p["forwards"] for p in parts)
    if not forwards:
        return None
    ratios = zip(*(p["block_execution_ratio"] for p in parts))
    return {
        "forwards": forwards,
        FLOPS_KEYS["papers"]: sum(p[FLOPS_KEYS["papers"]] * p["forwards"] for p in parts) / forwards,
        FLOPS_KEYS["whole-model"]: sum(p["tflops"] for p in parts) / sum(p["tflops_no_skip"] for p in parts),
        "mean_executed_blocks": sum(p["mean_executed_blocks"] * p["forwards"] for p in parts) / forwards,
        "block_execution_ratio": [sum(x * p["forwards"] for x, p in zip(block, parts)) / forwards for block in ratios],
    }


def _leaves(task: str, groups: dict[str, list[str]]) -> list[str]:
    children = groups.get(task) or []
    return [leaf for child in children for leaf in _leaves(child, groups)] if children else [task]


def comparable_settings(run: Run, task: str) -> dict[str, Any]:
    """What must match for ``run`` to be compared with a base on ``task``: weights, Monte-Carlo and decoding
    settings, shots, limit, the task's generation_kwargs and version, chat template. Not seed or skip."""
    dlmskip = run.dlmskip or {}
    task_config = (run.data.get("configs") or {}).get(task) or {}
    settings = {
        "fingerprint": dlmskip.get("fingerprint"),
        "likelihood": dlmskip.get("likelihood"),
        "generation": dlmskip.get("generation"),
        "check_greedy": dlmskip.get("check_greedy"),
        "n-shot": (run.data.get("n-shot") or {}).get(task),
        "limit": (run.data.get("config") or {}).get("limit"),
        "generation_kwargs": task_config.get("generation_kwargs"),
        "chat_template": run.data.get("chat_template"),
        "fewshot_as_multiturn": run.data.get("fewshot_as_multiturn"),
    }
    version = (task_config.get("metadata") or {}).get("version")
    if version is not None:
        settings["version"] = version
    return settings


def differences(a: Any, b: Any, name: str = "") -> list[str]:
    """Dotted names where two settings trees differ: ["fingerprint", "likelihood.mc_num"]."""
    if isinstance(a, dict) and isinstance(b, dict):
        found: list[str] = []
        for key in dict.fromkeys([*a, *b]):
            found += differences(a.get(key, _ABSENT), b.get(key, _ABSENT), f"{name}.{key}" if name else key)
        return found
    return [] if a == b else [name]


# ---- the leaderboard -------------------------------------------------------------------------


def build_leaderboard(
    runs: list[Run], metric: str | None = None, tasks: list[str] | None = None, figure: str = "papers"
) -> Leaderboard:
    """Rows sorted by task, base first, then by ``figure``'s FLOPs descending; with their footnotes."""
    rows: list[Row] = []
    metrics: dict[str, str | None] = {}
    for task in select_tasks(runs, tasks):
        task_runs = [r for r in runs if task in r.data["results"]]
        keys = list(dict.fromkeys(k for r in task_runs for k in metric_keys(r.data["results"][task])))
        metrics[task] = choose_metric(keys, metric)
        rows += _task_rows(task, task_runs, metrics[task])
    models = {m: i for i, m in enumerate(dict.fromkeys(r.model for r in runs if r.family != "other"))}
    rows.sort(key=lambda r: _row_order(r, figure, models))
    return Leaderboard(rows, metrics, _notes(rows, metrics, metric, runs))


def _task_rows(task: str, runs: list[Run], metric: str | None) -> list[Row]:
    """Each non-base row against the first base of its model evaluated the same way, else the model's
    first base (flagged). A file of another lm-eval model with no base of its checkpoint is compared
    with the first base (flagged); a row of a model that has no base here gets no delta."""
    rows = [Row(task, r, metric, *_score(r, task, metric), task_flops(r, task)) for r in runs]
    settings = [comparable_settings(r, task) for r in runs]
    bases = [(row, s) for row, s in zip(rows, settings) if row.family == "base"]
    compared = []
    for row, mine in zip(rows, settings):
        own = [(b, s) for b, s in bases if b.run.model == row.run.model]
        if row.family == "other" and not own:
            own = bases[:1]
        if row.family != "base" and own:
            base, theirs = next(((b, s) for b, s in own if not differences(s, mine)), own[0])
            row = replace(row, base=base.run, delta_points=_delta(row.score, base.score),
                          retained_pct=_retained(row.score, base.score), differs_from_base=tuple(differences(theirs, mine)))
        compared.append(row)
    return compared


def _delta(score: float | None, base: float | None) -> float | None:
    return None if score is None or base is None else (score - base) * 100.0


def _retained(score: float | None, base: float | None) -> float | None:
    return None if score is None or not base else score / base * 100.0


def _score(run: Run, task: str, metric: str | None) -> tuple[float | None, float | None]:
    if metric is None:
        return None, None
    scores = run.data["results"][task]
    name, _, filter_name = metric.partition(",")
    return _number(scores.get(metric)), _number(scores.get(f"{name}_stderr,{filter_name}"))


def _row_order(row: Row, figure: str, models: dict[str | None, int]) -> tuple:
    flops = row.normalized_flops(figure)
    model = models.get(row.run.model, len(models)) if row.family != "other" else len(models)
    return row.task, model, row.family != "base", flops is None, -(flops or 0.0), row.method, row.run.name


def _notes(rows: list[Row], metrics: dict[str, str | None], requested: str | None, runs: list[Run]) -> list[str]:
    notes = [f"{r.name}: no config.dlmskip (model {(r.data.get('config') or {}).get('model')!r}): listed as "
             f"'{OTHER_MODEL}' with FLOPs 1.0, never used as the base" for r in runs if r.dlmskip is None]
    for task in sorted(metrics):
        task_rows = [r for r in rows if r.task == task]
        if metrics[task] is None:
            notes.append(f"{task}: no metric {requested or 'at all'} in its results; scores left empty")
        if not any(r.family == "base" for r in task_rows):
            notes.append(f"{task}: no base run (skip method none) among the runs; Δ vs base left empty")
        else:
            with_base = {r.run.model for r in task_rows if r.family == "base"}
            for model in dict.fromkeys(r.run.model for r in task_rows if r.family not in ("base", "other")):
                if model not in with_base:
                    notes.append(f"{task}: no base run of {model} among the runs; its Δ vs base left empty")
        for r in task_rows:
            if metrics[task] is not None and r.score is None:
                notes.append(f"{task} {r.method} ({r.run.name}): has no {metrics[task]}; score left empty")
            if r.differs_from_base:
                notes.append(f"! {task} {r.method} ({r.run.name}): differs from base ({r.base.name}) "
                             f"in {', '.join(r.differs_from_base)}")
    return notes


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def short_number(value: Any) -> str:
    """0.3 for 0.3, 1 for 1.0, ? when absent: numbers in labels."""
    return "?" if value is None else f"{value:g}" if isinstance(value, (int, float)) else str(value)
