"""The figures themselves, drawn with Agg and read back: labels, lines, axes and block numbering."""

from __future__ import annotations

import pytest
import torch

from lm_eval_dlmskip.report.calibrate import select_blocks
from lm_eval_dlmskip.report.leaderboard import build_leaderboard, load_runs
from lm_eval_dlmskip.report.plots import accuracy_figure, analysis_figures, routed_blocks_figure

from .test_compare import routed, write_run

PROFILE = {"method": "static", "skip_profile": "profile.json"}


@pytest.fixture(autouse=True)
def close_figures():
    yield
    from matplotlib import pyplot

    pyplot.close("all")


@pytest.fixture
def board(tmp_path):
    """The first day's leaderboard: two routers with one λ that learned nothing (at the base point),
    static k=2 scoring and costing what random k=2 does, and scores at 100 %."""
    runs = [
        write_run(tmp_path, "base", {"method": "none"}, {"piqa": 1.0, "arc": 1.0}),
        write_run(tmp_path, "static-k1", {**PROFILE, "skip_layers": [4], "k": 1}, {"piqa": 1.0, "arc": 1.0}),
        write_run(tmp_path, "static-k2", {**PROFILE, "skip_layers": [4, 6], "k": 2}, {"piqa": 0.97, "arc": 1.0}),
        write_run(tmp_path, "random-k1-seed0", {"method": "random", "k": 1, "seed": 0}, {"piqa": 0.99, "arc": 1.0}),
        write_run(tmp_path, "random-k2-seed0", {"method": "random", "k": 2, "seed": 0}, {"piqa": 0.97, "arc": 1.0}),
        write_run(tmp_path, "random-k1-seed1", {"method": "random", "k": 1, "seed": 1}, {"piqa": 0.98, "arc": 1.0}),
        write_run(tmp_path, "random-k2-seed1", {"method": "random", "k": 2, "seed": 1}, {"piqa": 0.96, "arc": 1.0}),
        write_run(tmp_path, "routed-a", {**routed(0.3), "router": "ckpts/a"}, {"piqa": 1.0, "arc": 1.0}, flops_papers=1.0),
        write_run(tmp_path, "routed-b", {**routed(0.3), "router": "ckpts/b"}, {"piqa": 1.0, "arc": 1.0}, flops_papers=1.0),
    ]
    return build_leaderboard(load_runs(runs))


def labels_of(ax) -> list[str]:
    return [line for note in ax.texts for line in note.get_text().split("\n")]


def test_every_point_has_one_unique_label_inside_the_axes(board):
    fig = accuracy_figure(board, "piqa")
    ax = fig.axes[0]
    labels = labels_of(ax)
    assert len(labels) == len(set(labels)) == 9
    assert {"base", "static k=1 [4]", "static k=2 [4,6]"} < set(labels)
    assert {"routed λ=0.3 τ=0.1 (routed-a)", "routed λ=0.3 τ=0.1 (routed-b)"} < set(labels)
    assert {"random k=2 (random-k2-seed0)", "random k=2 (random-k2-seed1)"} < set(labels)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    inside, page = ax.get_window_extent(renderer), fig.bbox
    for note in ax.texts:  # the label of the point at FLOPs 1.0 too
        extent = note.get_window_extent(renderer)
        assert inside.x0 <= extent.x0 and extent.x1 <= inside.x1, note.get_text()
        assert inside.y0 <= extent.y0 and extent.y1 <= inside.y1, note.get_text()
    texts = [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.get_xticklabels(), *ax.get_yticklabels(),
             *(t for legend in fig.legends for t in legend.get_texts())]
    for text in (t for t in texts if t.get_visible() and t.get_text() and _in_view(ax, t)):
        extent = text.get_window_extent(renderer)
        assert page.x0 <= extent.x0 and extent.x1 <= page.x1 and page.y0 <= extent.y0 and extent.y1 <= page.y1, text


def test_labels_of_nearby_points_do_not_cover_each_other(tmp_path):
    """The demo's leaderboard: two routers and static k=3 close together at 100 %, their labels stacked."""
    runs = [
        write_run(tmp_path, "base", {"method": "none"}, {"gen": 1.0}),
        write_run(tmp_path, "static-k3", {**PROFILE, "skip_layers": [3, 5, 7], "k": 3}, {"gen": 1.0}, flops_papers=0.625),
        write_run(tmp_path, "static-k2", {**PROFILE, "skip_layers": [5, 7], "k": 2}, {"gen": 1.0}, flops_papers=0.75),
        write_run(tmp_path, "routed-rdemo", {**routed(1.0), "router": "r/rdemo"}, {"gen": 1.0}, flops_papers=0.5956),
        write_run(tmp_path, "routed-r1", {**routed(1.0), "router": "r/r1"}, {"gen": 1.0}, flops_papers=0.53),
        write_run(tmp_path, "random-k3", {"method": "random", "k": 3, "seed": 0}, {"gen": 0.1}, flops_papers=0.625),
    ]
    fig = accuracy_figure(build_leaderboard(load_runs(runs)), "gen")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    extents = [(note.get_text(), note.get_window_extent(renderer)) for note in fig.axes[0].texts]
    assert len(extents) == 6
    for i, (a, box_a) in enumerate(extents):
        for b, box_b in extents[i + 1:]:
            assert not box_a.overlaps(box_b), (a, b)


def _in_view(ax, tick_label) -> bool:
    """Tick labels of ticks outside the view limits are not drawn."""
    x, y = tick_label.get_position()
    if tick_label in ax.get_xticklabels():
        return min(ax.get_xlim()) <= x <= max(ax.get_xlim())
    if tick_label in ax.get_yticklabels():
        return min(ax.get_ylim()) <= y <= max(ax.get_ylim())
    return True


def test_lines_join_one_series_along_its_swept_setting(board):
    ax = accuracy_figure(board, "piqa").axes[0]
    joined = [sorted(zip(line.get_xdata(), line.get_ydata())) for line in ax.lines
              if len(line.get_xdata()) > 1 and line.get_label() != "base accuracy"]
    k1, k2 = 31 / 32, 30 / 32
    assert sorted(joined) == sorted([
        [(k2, 97.0), (k1, 100.0)],  # static k=1, 2 of one profile
        [(k2, 97.0), (k1, 99.0)],  # random, seed 0
        [(k2, 96.0), (k1, 98.0)],  # random, seed 1
    ])  # the two routers with λ=0.3 are not joined (to each other or through the base)
    legend = [t.get_text() for t in ax.figure.legends[0].get_texts()]
    assert "random (k blocks per forward), seed=0" in legend and "random (k blocks per forward), seed=1" in legend
    assert "routed (one point per λ) (not joined: repeated λ)" in legend


def test_coinciding_points_stay_visible_and_named_together(board):
    ax = accuracy_figure(board, "piqa").axes[0]
    k2 = 30 / 32
    at = [line for line in ax.lines if list(line.get_xdata()) == [k2] and list(line.get_ydata()) == [97.0]]
    static, random_ = sorted(at, key=lambda line: line.get_markersize())
    assert static.get_marker() == "o" and random_.get_marker() == "s"
    assert random_.get_markerfacecolor() == "none" and random_.get_markersize() > static.get_markersize()
    assert "static k=2 [4,6]\nrandom k=2 (random-k2-seed0)" in [t.get_text() for t in ax.texts]
    at_base = [line for line in ax.lines if list(line.get_xdata()) == [1.0] and list(line.get_ydata()) == [100.0]]
    assert [line.get_marker() for line in at_base] == ["*", "^", "^"]  # the base star, ringed by both routers
    assert len({line.get_markersize() for line in at_base}) == 3
    assert "base\nrouted λ=0.3 τ=0.1 (routed-a)\nrouted λ=0.3 τ=0.1 (routed-b)" in [t.get_text() for t in ax.texts]


@pytest.mark.parametrize("task", ["piqa", "arc"])  # arc: every run scores 100 %
def test_accuracy_axis_stops_at_100_percent(board, task):
    ax = accuracy_figure(board, task).axes[0]
    ax.figure.canvas.draw()
    bottom, top = ax.get_ylim()
    assert top == 100.0 and bottom < 100.0
    assert max(t for t in ax.get_yticks() if bottom <= t <= top) <= 100.0


def _assert_blocks_numbered_from_zero(ax, n_blocks: int) -> None:
    """Block axes are 0-based (as model_args); the papers' 1-based layers sit on a second axis above."""
    ax.figure.canvas.draw()
    assert "0-based" in ax.get_xlabel()
    (papers,) = ax.child_axes
    assert "1-based" in papers.get_xlabel()
    assert papers.get_xlim() == pytest.approx([x + 1 for x in ax.get_xlim()])
    assert min(papers.get_xticks()) == 1 and max(papers.get_xticks()) == n_blocks
    assert ax.get_xlim()[0] < 0 < n_blocks - 1 < ax.get_xlim()[1] < n_blocks


def test_routed_heatmap_numbers_blocks_from_zero(board):
    ax = routed_blocks_figure(board).axes[0]
    _assert_blocks_numbered_from_zero(ax, 32)
    assert [t.get_text() for t in ax.get_xticklabels()][:3] == ["0", "1", "2"]
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "arc λ=0.3 (routed-a)", "arc λ=0.3 (routed-b)", "piqa λ=0.3 (routed-a)", "piqa λ=0.3 (routed-b)",
    ]


def test_analyze_profile_figure_marks_threshold_selection_and_what_was_measured():
    n_layers = 6
    trace = {"similarity": torch.rand(3, 2, n_layers), "tokenwise_first": torch.rand(n_layers + 1, 5),
             "tokenwise_last": torch.rand(n_layers + 1, 5), "norm_mean": torch.rand(n_layers + 1) + 1,
             "norm_max": torch.rand(n_layers + 1) + 2}
    mean = [0.5, 0.9, 0.8, 0.95, 0.7, 0.6]
    calibration = {
        "similarity": {"mean": mean, "std": [0.01] * n_layers}, "threshold": 0.75, "max_skip": 4,
        "allow_adjacent": False, "selection_order": select_blocks(mean, 0.75, 4),
        "data": {"source": "task demo: 9 documents", "n_prompts": 9, "mask_fractions": [1.0, 0.5],
                 "answer_length": 6, "positions": "prompt", "seed": 0},
    }
    assert calibration["selection_order"] == [3, 1]
    figures = analysis_figures(trace, calibration, "tiny")
    ax = figures["similarity_profile"].axes[0]
    flat = [line for line in ax.lines if len(set(line.get_ydata())) == 1 and len(line.get_ydata()) == 2]
    assert [line.get_ydata()[0] for line in flat] == [0.75]  # the threshold given, not 0.95
    marked = next(line for line in ax.lines if list(line.get_xdata()) == [3, 1])
    assert list(marked.get_ydata()) == [0.95, 0.9]
    assert [t.get_text() for t in ax.texts] == ["#1", "#2"]
    (legend,) = [[t.get_text() for t in legend.get_texts()] for legend in figures["similarity_profile"].legends]
    assert any("skip_layers=[1, 3]" in t for t in legend) and "threshold 0.75" in legend
    subtitle = ax.get_title().replace("\n", " ")
    for said in ("9 prompts (task demo: 9 documents)", "mask fraction(s) 1, 0.5", "prompt positions", "seed 0",
                 "similarity >= 0.75", "at most 4", "never two adjacent"):
        assert said in subtitle, said
    for name in ("similarity_profile", "similarity_heatmap"):
        _assert_blocks_numbered_from_zero(figures[name].axes[0], n_layers)


def budget_router(target: float) -> dict:
    """A routed run's skip settings as describe_router writes them for dlmskip train --target-ratio."""
    return {"method": "routed", "router": f"sweep/routers/target{target:g}", "tau": 0.1, "lambda": None,
            "alpha_target": None, "mask_scaling": True, "target_ratio": target, "router_shape": {"hidden": 8}}


def test_routers_trained_to_targets_are_one_line_along_the_target(tmp_path):
    """Three budget routers (R = 0.9, 0.8, 0.7) are one series joined in R order, named by R, beside
    the λ routers' own series; the heatmap names them by R too."""
    runs = [
        write_run(tmp_path, "base", {"method": "none"}, {"gen": 1.0}),
        write_run(tmp_path, "routed-target0.9", budget_router(0.9), {"gen": 1.0}, flops_papers=0.9),
        write_run(tmp_path, "routed-target0.7", budget_router(0.7), {"gen": 0.9}, flops_papers=0.71),
        write_run(tmp_path, "routed-target0.8", budget_router(0.8), {"gen": 0.95}, flops_papers=0.79),
        write_run(tmp_path, "routed-l1", routed(1.0), {"gen": 0.8}, flops_papers=0.6),
    ]
    board = build_leaderboard(load_runs(runs))
    ax = accuracy_figure(board, "gen").axes[0]
    joined = [list(zip(line.get_xdata(), line.get_ydata())) for line in ax.lines
              if len(line.get_xdata()) > 1 and line.get_label() != "base accuracy"]
    assert joined == [[(0.71, 90.0), (0.79, 95.0), (0.9, 100.0)]]
    assert {"routed R=0.9 τ=0.1", "routed R=0.8 τ=0.1", "routed R=0.7 τ=0.1", "routed λ=1 τ=0.1"} <= set(labels_of(ax))
    legend = [t.get_text() for t in ax.figure.legends[0].get_texts()]
    assert "routed to a budget (one point per target ratio R)" in legend and "routed (one point per λ)" in legend
