"""The per-task FLOPs figures as users see them: the log line of each task and the table printed
below lm-eval's results table (llada_skip, dream_skip, hf_skip)."""

from __future__ import annotations

import atexit
import logging
import sys
from collections.abc import Iterable

from ..skipping.flops import FlopsMeter


def format_flops_table(summaries: dict[str, dict], n_layers: int, model: str = "llada_skip") -> str:
    """Per-task FLOPs and speed of ``--model`` ``model`` as a Markdown table like lm-eval's results
    table; decoding columns only when some task decoded, speed columns when it was timed."""
    decoded = any("nfe_per_request" in s for s in summaries.values())
    timed = any("wall_seconds" in s for s in summaries.values())
    header = ["Tasks", "Normalized FLOPs (papers)", "Normalized FLOPs (whole model)", f"Mean blocks run (of {n_layers})",
              "Forwards", *(["NFE/request", "FLOPs vs plain decoding"] if decoded else []),
              *(["Wall s", "Tokens/s", "Requests/s"] if timed else [])]
    rows = [[task, f"{s['normalized_flops_papers']:.4f}", f"{s['normalized_flops_whole_model']:.4f}",
             f"{s['mean_executed_blocks']:.2f}", str(s["forwards"]),
             *([f"{s['nfe_per_request']:.2f}", f"{s['normalized_flops_vs_plain_decoding']:.4f}"]
               if "nfe_per_request" in s else ["", ""])[: 2 * decoded],
             *([f"{s['wall_seconds']:.1f}", f"{s['tokens_per_s']:.1f}" if "tokens_per_s" in s else "",
                f"{s['requests_per_s']:.2f}"] if "wall_seconds" in s else ["", "", ""])[: 3 * timed]]
            for task, s in sorted(summaries.items())]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["|" + "|".join(c.center(w) for c, w in zip(r, widths)) + "|" for r in [header, *rows]]
    lines.insert(1, "|" + "|".join("-" * w for w in widths) + "|")
    return "\n".join([f"{model} FLOPs per task (1.0 = nothing skipped):", *lines])


class TableAtExit:
    """Prints the latest FLOPs table below lm-eval's results table under the ``lm_eval`` CLI:
    lm-eval asks for the model info (rank 0 only), then prints its tables and exits, so the table
    is printed at exit. Library callers of ``simple_evaluate`` get nothing printed."""

    def __init__(self) -> None:
        self.table: str | None = None

    def show(self, table: str) -> None:
        if getattr(sys.modules.get("__main__"), "cli_evaluate", None) is None:  # not python -m lm_eval / lm_eval
            return
        if self.table is None:
            atexit.register(lambda: print("\n" + self.table, flush=True))
        self.table = table


def log_task_flops(logger: logging.Logger, meter: FlopsMeter, kind: str, tasks: Iterable[str], model: str,
                   n_layers: int, ran: str, rank: int = 0) -> None:
    """One line per task with its normalized FLOPs (on rank 0), and the routers' warnings."""
    if rank != 0:
        return
    summaries = meter.summary()
    for task in sorted(tasks):
        s = summaries[task]
        logger.info("%s %s [%s]: normalized FLOPs %.4f (papers) %.4f (whole model), %.2f of %d %s on average over "
                    "%d forwards", model, kind, task, s["normalized_flops_papers"], s["normalized_flops_whole_model"],
                    s["mean_executed_blocks"], n_layers, ran, s["forwards"])
    for warning in meter.router_warnings(tasks, model):
        logger.warning(warning)
