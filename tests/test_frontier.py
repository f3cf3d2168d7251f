"""The static envelope a routed point is measured against, and the verdicts of the frontier table,
against values worked out by hand."""

import pytest

from lm_eval_dlmskip.report.frontier import (
    FrontierRow,
    RoutedPoint,
    frontier_rows,
    markdown_table,
    nearest_k,
    static_envelope,
    verdicts,
)

# base 0.95 @ 1.0; k=1 0.50 @ 0.875 (under the hull); k=2 0.90 @ 0.75; k=3 0.20 @ 0.625
STATIC = [(1.0, 0.95), (0.875, 0.50), (0.75, 0.90), (0.625, 0.20)]


@pytest.mark.parametrize("ratio, expected", [
    (1.0, 0.95),
    (0.75, 0.90),
    (0.8, 0.91),  # 0.90 + 0.05 * (0.05 / 0.25): time-sharing k=2 and base, not the k=1 point
    (0.875, 0.925),  # the hull passes above the measured k=1 point
    (0.7, 0.62),  # 0.20 + 0.70 * (0.075 / 0.125)
    (0.625, 0.20),
])
def test_envelope_is_the_upper_hull_interpolated(ratio, expected):
    assert static_envelope(STATIC, ratio) == pytest.approx(expected)


def test_envelope_never_falls_below_a_cheaper_static_point():
    # skipping helps: 0.90 at 0.75, base only 0.50; at 0.9 the k=2 set is allowed (it spends less)
    assert static_envelope([(1.0, 0.50), (0.75, 0.90)], 0.9) == pytest.approx(0.90)


def test_envelope_is_undefined_below_the_cheapest_static_point():
    assert static_envelope(STATIC, 0.6) is None
    assert static_envelope([], 0.9) is None


def test_nearest_k():
    assert nearest_k(0.80, 8, [1, 2, 3]) == 2  # 0.75 is nearer than 0.875
    assert nearest_k(0.8125, 8, [1, 2, 3]) == 1  # a tie (0.875 vs 0.75) takes the smaller k
    assert nearest_k(0.5, 8, [1, 2, 3]) == 3


def _row(accuracy: float, envelope: float | None, ratio: float = 0.8, target: float = 0.8) -> FrontierRow:
    return FrontierRow(RoutedPoint("routed", target, ratio, accuracy), envelope, envelope, (2, 0.1))


@pytest.mark.parametrize("accuracy, envelope, cells", [
    (0.92, 0.91, ["yes", "yes"]),  # strictly better
    (0.91, 0.91, ["yes", "**no**"]),  # equal: holds, not better
    (0.90, 0.91, ["yes", "**no**"]),  # exactly one point below: within the tolerance
    (0.89, 0.91, ["**no**", "**no**"]),  # two points below
    (0.50, None, ["n/a", "n/a"]),  # below every static point
])
def test_table_verdicts(accuracy, envelope, cells):
    line = markdown_table([_row(accuracy, envelope)]).splitlines()[2]
    assert [c.strip() for c in line.strip("|").split("|")][-4:] == cells * 2


def test_table_marks_a_ratio_off_budget():
    lines = markdown_table([_row(0.9, 0.9, ratio=0.775), _row(0.9, 0.9, ratio=0.785)]).splitlines()[2:]
    assert [line.split("|")[4].strip() for line in lines] == ["0.0250 ✗", "0.0150"]


def test_done_needs_every_target_on_budget_holding_and_half_better():
    better, equal, worse = _row(0.95, 0.91), _row(0.91, 0.91), _row(0.85, 0.91)
    assert verdicts([better, equal], "oracle")["routed"]["done"] is True  # 1 of 2 better: half
    assert verdicts([better, equal, equal], "oracle")["routed"]["done"] is False  # 1 of 3
    assert verdicts([better, better, worse], "oracle")["routed"]["done"] is False
    off = _row(0.95, 0.91, ratio=0.83)
    assert verdicts([better, off], "oracle")["routed"] == {"on_budget": False, "holds": True, "better": 2, "points": 2,
                                                           "done": False}


def test_rows_take_each_static_kind_at_the_achieved_ratio():
    points = [RoutedPoint("routed", 0.8, 0.8, 0.93), RoutedPoint("routed from profile", 0.7, 0.7, 0.6)]
    profile = [(1.0, 0.95), (0.875, 0.5)]
    rows = frontier_rows(points, profile, STATIC, {1: 0.4, 2: 0.2, 3: 0.1}, 8)
    assert [(r.profile, r.random) for r in rows] == [(None, (2, 0.2)), (None, (2, 0.2))]
    assert [r.oracle for r in rows] == [pytest.approx(0.91), pytest.approx(0.62)]
