"""Figures: of a leaderboard, accuracy against normalized FLOPs per task (as the router paper's Figure 2),
the accuracy each model retains when runs of several models are compared (the static paper's Figure
1) and the per-block execution ratio of routed runs (the router paper's Figure 4); of ``dlmskip
analyze``, the static paper's similarity and norm pictures. matplotlib (a dependency) is imported here only, when a plot
is drawn, and draws off-screen (Agg)."""

from __future__ import annotations

import json
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..common.files import write_atomically
from .leaderboard import Leaderboard, Row, short_number

# family -> (colour, marker, legend)
FAMILIES = {
    "base": ("black", "*", "base (nothing skipped)"),
    "static": ("C0", "o", "static (k = blocks skipped)"),
    "random": ("C1", "s", "random (k blocks per forward)"),
    "routed": ("C2", "^", "routed (one point per λ)"),
    "budget": ("C4", "v", "routed to a budget (one point per target ratio R)"),
    "other": ("C3", "D", "other model or method"),
}
# family -> (the swept skip setting, the settings a series shares): a line joins one series' points in
# the swept order; the base's and other runs' points are never joined
SERIES = {
    "static": ("k", ("skip_profile",)),
    "random": ("k", ("seed",)),
    "routed": ("lambda", ("tau", "alpha_target", "mask_scaling", "router_shape", "trained_on", "trained_for")),
    "budget": ("target_ratio", ("tau", "mask_scaling", "router_shape", "trained_on", "trained_for")),
}
SWEPT_NAMES = {"k": "k", "lambda": "λ", "target_ratio": "R"}
LINESTYLES = ("-", "--", ":", "-.")
MARKER_SIZES = {"*": 15.0}  # others: 7
NEAR = 0.015  # points closer than this share of both axes' spans coincide on the page
FLOPS_AXIS = {
    "papers": "normalized FLOPs, papers' figure (executed blocks / all blocks)",
    "whole-model": "normalized FLOPs, whole model (spent / spent without skipping)",
}
BLOCK_AXIS = "block (0-based, as in model_args)"


@dataclass(frozen=True)
class Point:
    """One run's point on a task's accuracy-vs-FLOPs figure."""

    row: Row
    x: float  # normalized FLOPs
    y: float  # accuracy, %
    label: str  # unique within the figure

    @property
    def family(self) -> str:
        """The row's family; routed runs trained to a budget (--target-ratio) form their own series."""
        if self.row.family == "routed" and self.row.run.skip.get("target_ratio") is not None:
            return "budget"
        return self.row.family if self.row.family in FAMILIES else "other"


@dataclass(frozen=True)
class Series:
    """Points of one family drawn alike; joined by a line only when they sweep one setting."""

    family: str
    legend: str
    points: list[Point]
    linestyle: str  # "none": not joined


def plot_leaderboard(board: Leaderboard, out_dir: Path, figure: str = "papers") -> list[Path]:
    """Every figure the leaderboard supports; returns the files written."""
    written = [plot_accuracy_vs_flops(board, task, out_dir, figure) for task in sorted(board.metrics)]
    written += [plot_retained(board, task, out_dir, figure) for task in sorted(board.metrics)]
    heatmap = plot_routed_blocks(board, out_dir)
    if heatmap is None:
        print("no routed runs with per-block execution ratios: routed_block_execution.png not written")
    return [p for p in [*written, heatmap] if p is not None]


def plot_accuracy_vs_flops(board: Leaderboard, task: str, out_dir: Path, figure: str = "papers") -> Path | None:
    """``accuracy_figure`` as accuracy_vs_flops_TASK.png; None when there is nothing to plot."""
    fig = accuracy_figure(board, task, figure)
    return None if fig is None else _save(fig, out_dir / f"accuracy_vs_flops_{_file_safe(task)}.png")


def accuracy_figure(board: Leaderboard, task: str, figure: str = "papers") -> Any | None:
    """Accuracy (%) against normalized FLOPs, as the router paper's Figure 2: a line per series, every
    point labelled uniquely inside the axes, coinciding points drawn as rings around each other with
    one label naming them all; None when no run of the task has both numbers."""
    rows = [r for r in board.rows if r.task == task and r.score is not None and r.normalized_flops(figure) is not None]
    if not rows:
        return None
    points = [Point(r, r.normalized_flops(figure), r.score * 100, label) for r, label in zip(rows, point_labels(rows))]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5.4), layout="constrained")
    series = group_series(points)
    for s in series:
        if s.linestyle != "none":
            ax.plot([p.x for p in s.points], [p.y for p in s.points], color=FAMILIES[s.family][0], linestyle=s.linestyle)
    ax.update_datalim([(p.x, p.y) for p in points])
    ax.autoscale_view()
    ax.set_xlim(ax.get_xlim())  # fixed from here on: coinciding() measures against these spans
    _clip_percent_axis(ax)
    notes = [_draw_coinciding(ax, group) for group in coinciding([p for s in series for p in s.points], ax)]
    handles = [_legend_handle(s) for s in series]
    bases = [p for p in points if p.family == "base"]
    if bases:
        handles.append(ax.axhline(bases[0].y, color="black", linestyle="--", linewidth=1, label="base accuracy"))
    ax.set_xlabel(FLOPS_AXIS[figure])
    ax.set_ylabel(f"accuracy ({board.metrics[task]}, %)")
    ax.set_title(f"{task}: accuracy against compute")
    ax.grid(alpha=0.3)
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=8)
    _keep_inside(fig, ax, notes)
    _separate(fig, notes)
    return fig


def plot_retained(board: Leaderboard, task: str, out_dir: Path, figure: str = "papers") -> Path | None:
    """``retained_figure`` as retained_vs_flops_TASK.png; None unless several models ran the task."""
    fig = retained_figure(board, task, figure)
    return None if fig is None else _save(fig, out_dir / f"retained_vs_flops_{_file_safe(task)}.png")


def retained_figure(board: Leaderboard, task: str, figure: str = "papers") -> Any | None:
    """Accuracy retained (% of each model's own base score) against normalized FLOPs, a line per model
    (the static paper's Figure 1); None unless runs of two models or more have a base to compare with."""
    by_model: dict[str, list[tuple[float, float, Row]]] = {}
    for r in board.rows:
        x = r.normalized_flops(figure)
        y = 100.0 if r.family == "base" and r.score else r.retained_pct
        if r.task == task and r.family != "other" and x is not None and y is not None:
            by_model.setdefault(r.run.model_label, []).append((x, y, r))
    if len(by_model) < 2:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5.4), layout="constrained")
    markers = ("o", "s", "^", "D", "v", "P")
    notes = []
    for i, (model, points) in enumerate(by_model.items()):
        points.sort(key=lambda p: -p[0])
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=markers[i % len(markers)], label=model)
        for x, y, r in points:
            if r.family != "base":
                notes.append(ax.annotate(r.method, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=7))
    ax.axhline(100.0, color="black", linestyle="--", linewidth=1, label="each model's base")
    ax.set_xlabel(FLOPS_AXIS[figure])
    ax.set_ylabel(f"accuracy retained ({board.metrics[task]}, % of the model's base)")
    ax.set_title(f"{task}: accuracy each model keeps as blocks are skipped")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8)
    _keep_inside(fig, ax, notes)
    _separate(fig, notes)
    return fig


def point_labels(rows: list[Row]) -> list[str]:
    """The leaderboard's method name of each row, with the run's name where two would read alike;
    " !" as in the table when its settings differ from the base's."""
    return [label + (" !" if r.differs_from_base else "") for label, r in zip(_unique([r.method for r in rows], rows), rows)]


def group_series(points: list[Point]) -> list[Series]:
    """Per family, the series its points form (base and other runs: points only). A series whose
    swept setting repeats (two routers with the same λ) is left unjoined: no order joins it honestly."""
    found: list[Series] = []
    for family, (_, _, legend) in FAMILIES.items():
        members = [p for p in points if p.family == family]
        if family not in SERIES:
            found += [Series(family, legend, members, "none")] if members else []
            continue
        swept, shared = SERIES[family]
        groups: dict[tuple[str, ...], list[Point]] = {}
        for p in members:
            groups.setdefault(tuple(_text(p.row.run.skip.get(k)) for k in shared), []).append(p)
        varying = [i for i in range(len(shared)) if len({key[i] for key in groups}) > 1]
        for n, (key, group) in enumerate(groups.items()):
            text = legend + "".join(f", {shared[i]}={key[i]}" for i in varying)
            ranks = [_text(p.row.run.skip.get(swept)) for p in group]
            joined = len(group) > 1 and len(set(ranks)) == len(ranks)
            if len(group) > 1 and not joined:
                text += f" (not joined: repeated {SWEPT_NAMES[swept]})"
            group.sort(key=lambda p: (_number_or_zero(p.row.run.skip.get(swept)), -p.x, p.row.run.name))
            found.append(Series(family, text, group, LINESTYLES[n % len(LINESTYLES)] if joined else "none"))
    return found


def coinciding(points: list[Point], ax: Any) -> list[list[Point]]:
    """The points grouped by where they fall on the page (within NEAR of the axes' spans), in order."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    groups: list[list[Point]] = []
    for p in points:
        near = (g for g in groups if abs(g[0].x - p.x) <= NEAR * (x1 - x0) and abs(g[0].y - p.y) <= NEAR * (y1 - y0))
        group = next(near, None)
        if group is None:
            groups.append([p])
        else:
            group.append(p)
    return groups


def _draw_coinciding(ax: Any, group: list[Point]) -> Any:
    """The first point filled, each later one a larger ring of its own shape around it; one label
    naming them all (coloured as its point, black when the points differ in colour)."""
    size = 0.0
    for n, p in enumerate(group):
        colour, marker, _ = FAMILIES[p.family]
        size = size + 5.0 if n else MARKER_SIZES.get(marker, 7.0)
        ax.plot(p.x, p.y, linestyle="none", color=colour, marker=marker, markersize=size, clip_on=False, zorder=3,
                markerfacecolor="none" if n else colour, markeredgewidth=1.5 if n else 1.0)
    colours = {FAMILIES[p.family][0] for p in group}
    clear = size / 2 + 2  # points: the label starts beyond the outermost marker
    note = ax.annotate("\n".join(p.label for p in group), (group[0].x, group[0].y), textcoords="offset points",
                       xytext=(clear, clear), ha="left", va="bottom", fontsize=7,
                       color=colours.pop() if len(colours) == 1 else "black")
    note.set_in_layout(False)  # placed inside the axes by _keep_inside, so the layout need not make room
    return note


def _legend_handle(series: Series) -> Any:
    from matplotlib.lines import Line2D

    colour, marker, _ = FAMILIES[series.family]
    return Line2D([], [], color=colour, marker=marker, linestyle=series.linestyle,
                  markersize=min(MARKER_SIZES.get(marker, 7.0), 10.0), label=series.legend)


def _clip_percent_axis(ax: Any) -> None:
    """Accuracy axes stop at 100 % and 0 %: no tick shows a score that cannot be."""
    bottom, top = ax.get_ylim()
    top, bottom = min(top, 100.0), max(bottom, 0.0)
    ax.set_ylim(top - 5.0 if bottom >= top else bottom, top)


def _keep_inside(fig: Any, ax: Any, notes: list[Any]) -> None:
    """Turn a label that runs past the right or top of the axes to the other side of its point."""
    fig.canvas.draw()  # lays the figure out: the extents below are final
    renderer = fig.canvas.get_renderer()
    box = ax.get_window_extent(renderer)
    for note in notes:
        extent = note.get_window_extent(renderer)
        dx, dy = note.xyann
        if extent.x1 > box.x1:
            note.set_horizontalalignment("right")
            dx = -abs(dx)
        if extent.y1 > box.y1:
            note.set_verticalalignment("top")
            dy = -abs(dy)
        note.xyann = (dx, dy)


def _separate(fig: Any, notes: list[Any]) -> None:
    """Move a label that would cover one placed before it (right to left) a line further from its
    point, below it when it sits above the axes' middle, above it otherwise, until it is clear."""
    renderer = fig.canvas.get_renderer()
    placed = []
    for note in sorted(notes, key=lambda n: -n.xy[0]):
        extent = note.get_window_extent(renderer)
        box = note.axes.get_window_extent(renderer)
        down = extent.y0 > (box.y0 + box.y1) / 2
        for _ in range(len(placed)):
            if not any(extent.overlaps(other) for other in placed):
                break
            dx, dy = note.xyann
            step = (extent.height + 2) * 72 / fig.dpi  # pixels -> points of the offset
            note.xyann = (dx, dy - step if down else dy + step)
            extent = note.get_window_extent(renderer)
        placed.append(extent)


def plot_routed_blocks(board: Leaderboard, out_dir: Path) -> Path | None:
    """``routed_blocks_figure`` as routed_block_execution.png; None without routed runs."""
    fig = routed_blocks_figure(board)
    return None if fig is None else _save(fig, out_dir / "routed_block_execution.png")


def routed_blocks_figure(board: Leaderboard) -> Any | None:
    """Heatmap of how often each block ran: a row per routed run and task, blocks 0-based with the
    papers' layer numbers above; None without routed runs."""
    rows = [r for r in board.rows if r.family == "routed" and (r.flops or {}).get("block_execution_ratio")]
    if not rows:
        return None
    labels = _unique([f"{r.task} " + (f"R={short_number(r.run.skip['target_ratio'])}" if r.run.skip.get("target_ratio") is not None
                      else f"λ={short_number(r.run.skip.get('lambda'))}") for r in rows], rows)
    n_blocks = max(len(r.flops["block_execution_ratio"]) for r in rows)
    ratios = [r.flops["block_execution_ratio"] for r in rows]
    matrix = [[*ratio, *[float("nan")] * (n_blocks - len(ratio))] for ratio in ratios]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * n_blocks + 4), max(3.4, 2.0 + 0.4 * len(rows))), layout="constrained")
    image = ax.imshow(matrix, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(n_blocks), [str(i) for i in range(n_blocks)], fontsize=7 if n_blocks > 16 else 9)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.set_xlabel(BLOCK_AXIS)
    _paper_layer_axis(ax, n_blocks)
    fig.suptitle("Routed skipping: share of forwards that executed each block")  # the figure's width, not the axes'
    fig.colorbar(image, ax=ax, label="execution ratio (1 = always run)")
    return fig


def plot_analysis(trace: dict, calibration: dict, out: Path, title: str, denoising: bool = True) -> list[Path]:
    """The four pictures of ``dlmskip analyze`` (see report/analyze.py); returns the files. Without
    ``denoising`` (an autoregressive model's one forward) no heatmap over steps, one tokenwise panel."""
    out.mkdir(parents=True, exist_ok=True)
    return [_save(fig, out / f"{name}.png") for name, fig in analysis_figures(trace, calibration, title, denoising).items()]


def analysis_figures(trace: dict, calibration: dict, title: str, denoising: bool = True) -> dict[str, Any]:
    """name -> figure of ``dlmskip analyze``: ``trace`` from analyze's decoding, ``calibration`` a skip
    profile as calibrate's ``build_profile`` makes it."""
    plt = _pyplot()
    trace = {k: v.numpy() for k, v in trace.items()}
    figures = {"similarity_profile": _profile_figure(plt, calibration, title)}

    if denoising:
        fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
        image = ax.imshow(trace["similarity"].mean(1), aspect="auto", cmap="viridis", origin="upper")
        ax.set(title=f"Block input/output similarity over the decoding of {trace['similarity'].shape[1]} prompts — {title}",
               xlabel=BLOCK_AXIS, ylabel="denoising step (0 = all masked)")
        _paper_layer_axis(ax, trace["similarity"].shape[-1])
        fig.colorbar(image, ax=ax, label="cosine similarity (mean over prompts and their tokens)")
        figures["similarity_heatmap"] = fig

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
    figures["tokenwise_similarity"] = fig

    fig, ax = plt.subplots(figsize=(8, 4), layout="constrained")
    depth = list(range(len(trace["norm_mean"])))
    ax.semilogy(depth, trace["norm_mean"], marker="o", label="mean over tokens")
    ax.semilogy(depth, trace["norm_max"], marker="^", label="largest token (sink tokens)")
    ax.set(title=f"Hidden-state norm by depth — {title}", xlabel="hidden state (0 = embeddings, l = input of block l)",
           ylabel="L2 norm (log scale)")
    ax.legend()
    figures["hidden_norms"] = fig
    return figures


def _profile_figure(plt: Any, calibration: dict, title: str) -> Any:
    """calibrate's similarity per block with its threshold and the blocks it selects (numbered in the
    order chosen: skip_k=k takes the first k), and what was measured."""
    similarity, data = calibration["similarity"], calibration["data"]
    mean, std = similarity["mean"], similarity["std"]
    blocks = list(range(len(mean)))
    threshold, order = calibration["threshold"], calibration["selection_order"]
    fig, ax = plt.subplots(figsize=(8, 4.8), layout="constrained")
    ax.plot(blocks, mean, marker="o", label="mean")
    ax.fill_between(blocks, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.25,
                    label="± 1 std (prompts × mask fractions)")
    ax.axhline(threshold, color="grey", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    chosen = f"skip_layers={sorted(order)}" if order else "no block selected"
    ax.plot(order, [mean[b] for b in order], linestyle="none", marker="o", markersize=12, markerfacecolor="none",
            markeredgecolor="C3", markeredgewidth=2, label=f"calibrate selects {chosen} (#: order chosen)")
    for rank, block in enumerate(order, 1):
        ax.annotate(f"#{rank}", (block, mean[block]), textcoords="offset points", xytext=(0, 10), ha="center",
                    fontsize=8, color="C3")
    ax.set(xlabel=BLOCK_AXIS, ylabel="cosine similarity (1 = block changes nothing)")
    ax.margins(y=0.12)  # room for the order marks above the chosen blocks, under the top axis
    _paper_layer_axis(ax, len(mean))
    adjacency = "adjacent allowed" if calibration["allow_adjacent"] else "never two adjacent"
    if data["mask_fractions"] is None:  # an autoregressive model: one forward over prompt and answer
        states = "one forward over prompt + reference answer"
    else:
        fractions = ", ".join(f"{f:g}" for f in data["mask_fractions"])
        states = f"answer region {data['answer_length']} tokens, mask fraction(s) {fractions}"
    measured = (f"Measured as dlmskip calibrate does: {data['n_prompts']} prompts ({data['source']}); {states}; "
                f"mean over {data['positions']} positions; seed {data['seed']}. Selection: similarity >= {threshold:g}, at most "
                f"{calibration['max_skip']} blocks, {adjacency}.")
    fig.suptitle(f"Block input/output cosine similarity — {title}")
    ax.set_title("\n".join(textwrap.wrap(measured, 110)), fontsize=8)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8)
    return fig


def _paper_layer_axis(ax: Any, n_blocks: int) -> Any:
    """The papers' 1-based layer numbers along the top of a 0-based block axis: 1, then every few."""
    top = ax.secondary_xaxis("top", functions=(_to_paper_layer, _to_block))
    step = max(1, round(n_blocks / 8))
    top.set_xticks(sorted({1, *range(step, n_blocks + 1, step)}))
    top.set_xlabel("layer as the papers number it (1-based: block + 1)")
    return top


def _to_paper_layer(block: Any) -> Any:
    return block + 1


def _to_block(layer: Any) -> Any:
    return layer - 1


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def _save(fig: Any, path: Path) -> Path:
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=150))
    _pyplot().close(fig)
    return path


def _unique(labels: list[str], rows: list[Row]) -> list[str]:
    """Each label, followed by its run's name where another row has the same label."""
    return [f"{label} ({r.run.name})" if labels.count(label) > 1 else label for label, r in zip(labels, rows)]


def _text(value: Any) -> str:
    """A skip setting as legends show it (and as a key: lists and dicts compare by content)."""
    return short_number(value) if value is None or isinstance(value, (int, float, str)) else json.dumps(value, sort_keys=True)


def _number_or_zero(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else 0.0


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)
