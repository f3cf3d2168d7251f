"""The routed frontier against static skipping at equal FLOPs (issue 20): the static envelope a
routed point must reach, the verdicts and the table of ``bench/budget_frontier.py``.

FLOPs are the papers' normalized figure, the fraction of blocks executed. Two static sets can share
the evaluation documents (time-sharing), so every point on the segment between two static points is
reachable; and a set that executes fewer blocks is allowed at a larger budget. The best static
accuracy at a budget x is therefore the upper concave hull of the static points (base at 1.0
included) at x, or the hull's best point at a lower ratio if that is higher. Below the cheapest
static point it is not defined (nothing static was measured there)."""

from __future__ import annotations

from dataclasses import dataclass

TOLERANCE = 0.01  # "at least the best static set (within 1 point)": accuracy as a fraction
BUDGET_GAP = 0.02  # "achieved ratio within 0.02 of the target"
_EPS = 1e-9  # floating slack on comparisons of measured ratios and interpolated accuracies


def upper_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The vertices of the upper concave hull of (ratio, accuracy) points, by ratio ascending."""
    hull: list[tuple[float, float]] = []
    for p in sorted(set(points)):
        while hull and hull[-1][0] == p[0]:  # same ratio: sorted, so the later one is at least as good
            hull.pop()
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) >= 0:
            hull.pop()
        hull.append(p)
    return hull


def _cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
    """> 0 when o -> a -> b turns left (a lies below the segment o-b)."""
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def static_envelope(points: list[tuple[float, float]], ratio: float) -> float | None:
    """The best static accuracy at a budget of ``ratio`` (see the module's docstring); None below
    the cheapest static point or without points."""
    hull = upper_hull(points)
    if not hull or ratio < hull[0][0] - _EPS:
        return None
    best = max(y for x, y in hull if x <= ratio + _EPS)
    for (x0, y0), (x1, y1) in zip(hull, hull[1:]):
        if x0 <= ratio <= x1:
            best = max(best, y0 + (y1 - y0) * (ratio - x0) / (x1 - x0))
    return best


def nearest_k(ratio: float, n_layers: int, ks: list[int]) -> int | None:
    """The number of skipped blocks whose ratio (n - k) / n is closest to ``ratio`` (the smaller k on a tie)."""
    return min(ks, key=lambda k: (abs((n_layers - k) / n_layers - ratio), k)) if ks else None


@dataclass(frozen=True)
class RoutedPoint:
    series: str  # e.g. "routed", "routed from profile"
    target: float  # the requested execution ratio
    ratio: float  # achieved: lm_eval's normalized_flops_papers
    accuracy: float  # 0..1


@dataclass(frozen=True)
class FrontierRow:
    point: RoutedPoint
    profile: float | None  # static envelope (a): the profile's sets, chosen on training data
    oracle: float | None  # static envelope (b): every subset, chosen on the test documents
    random: tuple[int, float] | None  # (nearest k, mean accuracy over seeds)

    @property
    def gap(self) -> float:
        return abs(self.point.ratio - self.point.target)

    @property
    def on_budget(self) -> bool:
        return self.gap <= BUDGET_GAP + _EPS


def holds(accuracy: float, static: float | None) -> bool | None:
    """Routed at least the static envelope, within 1 point; None where the envelope is undefined."""
    return None if static is None else accuracy >= static - TOLERANCE - _EPS


def beats(accuracy: float, static: float | None) -> bool | None:
    """Routed strictly above the static envelope."""
    return None if static is None else accuracy > static + _EPS


def frontier_rows(points: list[RoutedPoint], profile: list[tuple[float, float]], oracle: list[tuple[float, float]],
                  random: dict[int, float], n_layers: int) -> list[FrontierRow]:
    """A row per routed point: the envelopes of both static kinds at its achieved ratio, random at the nearest k."""
    rows = []
    for p in points:
        k = nearest_k(p.ratio, n_layers, sorted(random))
        rows.append(FrontierRow(p, static_envelope(profile, p.ratio), static_envelope(oracle, p.ratio),
                                None if k is None else (k, random[k])))
    return rows


TABLE_HEADER = ("series", "target", "achieved ratio", "\\|ratio − target\\|", "routed acc %", "static (a) env. %",
                "static (b) env. %", "random (nearest k) %", "≥ (a) − 1 pt", "> (a)", "≥ (b) − 1 pt", "> (b)")


def markdown_table(rows: list[FrontierRow]) -> str:
    """The routed points against static and random, one line per series and target."""
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|---|" + "---:|" * (len(TABLE_HEADER) - 1)]
    for r in rows:
        p = r.point
        random = "" if r.random is None else f"{_pct(r.random[1])} (k={r.random[0]})"
        cells = [p.series, f"{p.target:g}", f"{p.ratio:.4f}", f"{r.gap:.4f}" + ("" if r.on_budget else " ✗"),
                 _pct(p.accuracy), _pct(r.profile), _pct(r.oracle), random,
                 _mark(holds(p.accuracy, r.profile)), _mark(beats(p.accuracy, r.profile)),
                 _mark(holds(p.accuracy, r.oracle)), _mark(beats(p.accuracy, r.oracle))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def verdicts(rows: list[FrontierRow], static: str) -> dict[str, dict]:
    """Per series, the issue's "done when" against static envelope ``static`` ("profile" or "oracle"):
    every target within 0.02, every point at least static - 1 point, strictly better on at least half."""
    out: dict[str, dict] = {}
    for series in dict.fromkeys(r.point.series for r in rows):
        mine = [r for r in rows if r.point.series == series]
        envelope = [getattr(r, static) for r in mine]
        held = [holds(r.point.accuracy, e) for r, e in zip(mine, envelope)]
        better = [beats(r.point.accuracy, e) for r, e in zip(mine, envelope)]
        on_budget = all(r.on_budget for r in mine)
        out[series] = {"on_budget": on_budget, "holds": all(h is True for h in held),
                       "better": sum(b is True for b in better), "points": len(mine),
                       "done": on_budget and all(h is True for h in held) and 2 * sum(b is True for b in better) >= len(mine)}
    return out


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _mark(value: bool | None) -> str:
    return "n/a" if value is None else "yes" if value else "**no**"
