"""Figures: of a leaderboard, accuracy against normalized FLOPs per task (as the router paper's Figure 2)
and the per-block execution ratio of routed runs (its Figure 4); of ``dlmskip analyze``, the static
paper's similarity and norm pictures. matplotlib (a dependency) is imported here only, when a plot
is drawn, and draws off-screen (Agg)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..files import write_atomically
from .compare import Leaderboard, Row, short_number

# family -> (colour, marker, legend); a family's points are joined in the order of _family_order
FAMILIES = {
    "static": ("C0", "o", "static (k = blocks skipped)"),
    "random": ("C1", "s", "random (k blocks per forward)"),
    "routed": ("C2", "^", "routed (one point per λ)"),
    "other": ("C3", "D", "other model or method"),
}
FLOPS_AXIS = {
    "papers": "normalized FLOPs, papers' figure (executed blocks / all blocks)",
    "whole-model": "normalized FLOPs, whole model (spent / spent without skipping)",
}


def plot_leaderboard(board: Leaderboard, out_dir: Path, figure: str = "papers") -> list[Path]:
    """Every figure the leaderboard supports; returns the files written."""
    written = [plot_accuracy_vs_flops(board, task, out_dir, figure) for task in sorted(board.metrics)]
    heatmap = plot_routed_blocks(board, out_dir)
    if heatmap is None:
        print("no routed runs with per-block execution ratios: routed_block_execution.png not written")
    return [p for p in [*written, heatmap] if p is not None]


def plot_accuracy_vs_flops(board: Leaderboard, task: str, out_dir: Path, figure: str = "papers") -> Path | None:
    """Accuracy (%) against normalized FLOPs, a line per method family, the base as a star and a dashed level."""
    rows = [r for r in board.rows if r.task == task and r.score is not None and r.normalized_flops(figure) is not None]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for family, (colour, marker, legend) in FAMILIES.items():
        points = sorted((r for r in rows if _family(r) == family), key=lambda r: _family_order(r, figure))
        if not points:
            continue
        xs, ys = [r.normalized_flops(figure) for r in points], [r.score * 100 for r in points]
        ax.plot(xs, ys, color=colour, marker=marker, label=legend)
        for r, x, y in zip(points, xs, ys):
            ax.annotate(_point_label(r), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=colour)
    bases = [r for r in rows if r.family == "base"]
    for i, base in enumerate(bases):
        ax.plot(base.normalized_flops(figure), base.score * 100, marker="*", markersize=15, color="black",
                linestyle="none", label="base (nothing skipped)" if i == 0 else None, zorder=3)
    if bases:
        ax.axhline(bases[0].score * 100, color="black", linestyle="--", linewidth=1, label="base accuracy")
    ax.set_xlabel(FLOPS_AXIS[figure])
    ax.set_ylabel(f"accuracy ({board.metrics[task]}, %)")
    ax.set_title(f"{task}: accuracy against compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, out_dir / f"accuracy_vs_flops_{_file_safe(task)}.png")


def plot_routed_blocks(board: Leaderboard, out_dir: Path) -> Path | None:
    """Heatmap of how often each block ran: a row per routed run and task, blocks numbered from 1."""
    rows = [r for r in board.rows if r.family == "routed" and (r.flops or {}).get("block_execution_ratio")]
    if not rows:
        return None
    labels = [f"{r.task} λ={short_number(r.run.skip.get('lambda'))}" for r in rows]
    labels = [f"{label} ({r.run.name})" if labels.count(label) > 1 else label for label, r in zip(labels, rows)]
    n_blocks = max(len(r.flops["block_execution_ratio"]) for r in rows)
    ratios = [r.flops["block_execution_ratio"] for r in rows]
    matrix = [[*ratio, *[float("nan")] * (n_blocks - len(ratio))] for ratio in ratios]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * n_blocks + 4), max(3.0, 1.6 + 0.4 * len(rows))))
    image = ax.imshow(matrix, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(n_blocks), [str(i + 1) for i in range(n_blocks)], fontsize=7 if n_blocks > 16 else 9)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.set_xlabel("block (1-based, as in the papers)")
    ax.set_title("Routed skipping: share of forwards that executed each block")
    fig.colorbar(image, ax=ax, label="execution ratio (1 = always run)")
    return _save(plt, fig, out_dir / "routed_block_execution.png")


def plot_analysis(trace: dict, out: Path, title: str, denoising: bool = True) -> list[Path]:
    """The four pictures of ``dlmskip analyze`` (see report/analyze.py); returns the files. Without
    ``denoising`` (an autoregressive model's one forward) no heatmap over steps, one tokenwise panel."""
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    trace = {k: v.numpy() for k, v in trace.items()}
    sims = trace["similarity"]  # [steps, B, n_layers]
    n_layers = sims.shape[-1]
    blocks = list(range(n_layers))
    flat = sims.reshape(-1, n_layers)
    mean, std = flat.mean(0), flat.std(0)
    files = []

    fig, ax = plt.subplots(figsize=(8, 4), layout="constrained")
    ax.plot(blocks, mean, marker="o", label="mean")
    ax.fill_between(blocks, mean - std, mean + std, alpha=0.25, label="± 1 std (prompts × steps)")
    ax.axhline(0.95, color="grey", linestyle="--", linewidth=1, label="threshold 0.95")
    ax.set(title=f"Block input/output cosine similarity — {title}", xlabel="block (0-based; paper layer = block + 1)",
           ylabel="cosine similarity (1 = block changes nothing)")
    ax.legend()
    files.append(_save(plt, fig, out / "similarity_profile.png"))

    if denoising:
        fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
        image = ax.imshow(sims.mean(1), aspect="auto", cmap="viridis", origin="upper")
        ax.set(title=f"Block input/output similarity over denoising — {title}", xlabel="block (0-based)",
               ylabel="denoising step (0 = all masked)")
        fig.colorbar(image, ax=ax, label="cosine similarity")
        files.append(_save(plt, fig, out / "similarity_heatmap.png"))

    panels = (("tokenwise_first", "first step (all masked)"), ("tokenwise_last", "last step")) if denoising else (
        ("tokenwise_first", "the prompt forward"),)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), sharey=True, layout="constrained", squeeze=False)
    axes = axes[0]
    for ax, (key, name) in zip(axes, panels):
        image = ax.imshow(trace[key], aspect="auto", cmap="magma", vmin=-1, vmax=1, origin="upper")
        columns = "last columns of the sequence" if denoising else "first columns of the prompts"
        ax.set(title=f"Neighbouring-token similarity, {name}", xlabel=f"token pair (i, i+1), {columns}")
    axes[0].set_ylabel("hidden state (0 = embeddings, l = input of block l, last = final norm)")
    fig.colorbar(image, ax=axes, label="cosine similarity")
    fig.suptitle(title)
    files.append(_save(plt, fig, out / "tokenwise_similarity.png"))

    fig, ax = plt.subplots(figsize=(8, 4), layout="constrained")
    depth = list(range(len(trace["norm_mean"])))
    ax.semilogy(depth, trace["norm_mean"], marker="o", label="mean over tokens")
    ax.semilogy(depth, trace["norm_max"], marker="^", label="largest token (sink tokens)")
    ax.set(title=f"Hidden-state norm by depth — {title}", xlabel="hidden state (0 = embeddings, l = input of block l)",
           ylabel="L2 norm (log scale)")
    ax.legend()
    files.append(_save(plt, fig, out / "hidden_norms.png"))
    return files


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def _save(plt: Any, fig: Any, path: Path) -> Path:
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=150, bbox_inches="tight"))
    plt.close(fig)
    return path


def _family(row: Row) -> str | None:
    """The line a row's point joins; None for a base, drawn as a star instead."""
    if row.family == "base":
        return None
    return row.family if row.family in ("static", "random", "routed") else "other"


def _family_order(row: Row, figure: str) -> tuple:
    skip = row.run.skip
    rank = skip.get("lambda") if row.family == "routed" else skip.get("k")
    return rank if isinstance(rank, (int, float)) else 0, -row.normalized_flops(figure), row.run.name


def _point_label(row: Row) -> str:
    """k or λ of the point; "!" as in the table when its settings differ from the base's."""
    skip, flag = row.run.skip, " !" if row.differs_from_base else ""
    if row.family in ("static", "random"):
        return f"k={skip.get('k')}{flag}"
    if row.family == "routed":
        return f"λ={short_number(skip.get('lambda'))}{flag}"
    return f"{row.run.name}{flag}"


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)
