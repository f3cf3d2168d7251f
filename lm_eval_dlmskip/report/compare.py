"""``dlmskip compare RUN...``: the leaderboard (leaderboard.py) as a terminal table, Markdown and
CSV, and its plots (plots.py)."""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path
from typing import Any

from ..common.files import check_output_dir, check_output_file, write_atomically
from .leaderboard import FLOPS_KEYS, Leaderboard, Row, build_leaderboard, load_runs

# ---- output ----------------------------------------------------------------------------------


def several_models(board: Leaderboard) -> bool:
    """Whether the leaderboard needs a model column: runs of more than one checkpoint."""
    return len({r.run.model for r in board.rows if r.family != "other"}) > 1


def _header(figure: str, models: bool) -> list[str]:
    return ["task", *(["model"] if models else []), "run", "method", "!", "FLOPs papers", "FLOPs whole",
            f"FLOPs Δ ({figure})", "acc %", "±", "Δ vs base (pts)", "retained %"]


def _left_columns(models: bool) -> int:
    """task, (model,) run, method, !: text, left-aligned; the rest are numbers."""
    return 5 if models else 4


def _cells(row: Row, figure: str, models: bool) -> list[str]:
    return [
        row.task, *([row.run.model_label] if models else []), row.run.name, row.method,
        "!" if row.differs_from_base else "",
        _fmt(row.normalized_flops("papers"), ".4f"), _fmt(row.normalized_flops("whole-model"), ".4f"),
        _fmt(row.flops_change_pct(figure), "+.2f", "%"), _fmt(_pct(row.score), ".2f"), _fmt(_pct(row.stderr), ".2f"),
        _fmt(row.delta_points, "+.2f"), _fmt(row.retained_pct, ".1f"),
    ]


def metric_lines(board: Leaderboard) -> list[str]:
    return [f"metric for {task}: {metric or '(none)'}" for task, metric in sorted(board.metrics.items())]


def format_table(board: Leaderboard, figure: str = "papers") -> str:
    """Aligned columns for the terminal, with the metric per task above and the footnotes below."""
    models = several_models(board)
    table = [_header(figure, models), *(_cells(r, figure, models) for r in board.rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    left = _left_columns(models)

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    body = [line(table[0]), "  ".join("-" * w for w in widths), *(line(c) for c in table[1:])]
    notes = ["", *board.notes] if board.notes else []
    return "\n".join([*metric_lines(board), "", *(b.rstrip() for b in body), *notes])


def format_markdown(board: Leaderboard, figure: str = "papers") -> str:
    """A Markdown table, the metric per task and the footnotes."""
    models = several_models(board)
    header = _header(figure, models)
    left = _left_columns(models)
    align = ["---"] * left + ["---:"] * (len(header) - left)
    rows = [header, align, *(_cells(r, figure, models) for r in board.rows)]
    table = ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    notes = [f"- {n}" for n in [*metric_lines(board), *board.notes]]
    return "\n".join([*table, "", *notes]) + "\n"


CSV_COLUMNS = (
    "task", "model", "model_family", "run", "file", "method", "family", "k", "lambda", "tau", "seed", "metric",
    "score", "stderr", "flops_papers", "flops_whole_model", "flops_change_papers_pct", "flops_change_whole_model_pct",
    "mean_executed_blocks", "base_run", "delta_points", "retained_pct", "differs_from_base",
)


def format_csv(board: Leaderboard) -> str:
    """One row per (run, task), numbers unformatted (score and stderr as lm-eval reports them, 0..1)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in board.rows:
        skip, dlmskip = r.run.skip, r.run.dlmskip or {}
        writer.writerow(_blank(v) for v in (
            r.task, r.run.model, r.run.model_family, r.run.name, r.run.path, r.method, r.family, skip.get("k"), skip.get("lambda"), skip.get("tau"),
            skip.get("seed", dlmskip.get("seed")), r.metric, r.score, r.stderr, r.normalized_flops("papers"),
            r.normalized_flops("whole-model"), _round(r.flops_change_pct("papers")),
            _round(r.flops_change_pct("whole-model")), (r.flops or {}).get("mean_executed_blocks"),
            r.base.name if r.base else None, _round(r.delta_points), _round(r.retained_pct),
            ";".join(r.differs_from_base),
        ))
    return out.getvalue()


def _pct(value: float | None) -> float | None:
    return None if value is None else value * 100.0


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 10)  # drop float noise such as -2.0000000000000018


def _blank(value: Any) -> Any:
    return "" if value is None else value


# ---- command line ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("runs", nargs="+", metavar="RUN", help="lm-eval output directory (searched for results_*.json) or results file")
    a("--metric", help="metric to show, e.g. acc or exact_match,flexible-extract (default: chosen per task)")
    a("--tasks", help="comma-separated tasks to list (default: all, a group standing for its subtasks)")
    a("--flops", choices=sorted(FLOPS_KEYS), default="papers",
      help="FLOPs figure for the Δ column, the sort and the plots' x axis")
    a("--markdown", metavar="PATH", help="also write the table and footnotes as Markdown")
    a("--csv", metavar="PATH", help="also write one CSV row per (run, task) with unformatted numbers")
    a("--plot", metavar="DIR", help="write accuracy-vs-FLOPs per task and the routed block heatmap")


def run_compare(args: argparse.Namespace) -> int:
    """Print the leaderboard; write the Markdown, CSV and plots asked for. Bad RUNs raise with their name."""
    for option, path in (("--markdown", args.markdown), ("--csv", args.csv)):
        if path:
            check_output_file(path, option)
    if args.plot:
        check_output_dir(args.plot, "--plot")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    board = build_leaderboard(load_runs(args.runs), metric=args.metric, tasks=tasks, figure=args.flops)
    print(format_table(board, args.flops))
    if args.markdown:
        text = format_markdown(board, args.flops)
        write_atomically(Path(args.markdown), lambda tmp: tmp.write_text(text))
        print(f"wrote {args.markdown}")
    if args.csv:
        text = format_csv(board)
        write_atomically(Path(args.csv), lambda tmp: tmp.write_text(text, newline=""))
        print(f"wrote {args.csv}")
    if args.plot:
        from .plots import plot_leaderboard

        for path in plot_leaderboard(board, Path(args.plot), args.flops):
            print(f"wrote {path}")
    return 0
