"""Routers trained to a requested execution ratio (``dlmskip train --target-ratio R``).

The fixed penalty ``lambda |alpha - alpha_target|`` lands anywhere: the cross-entropy pulls the
routers back toward running blocks by an amount that depends on the task, so one lambda gives 0.53
on one task and 1.00 on another. Here the budget is a constraint, executed share = R, held by its
dual variable: one offset c added to every router's execute logit (the bias of its last layer),
stepped after every optimizer step by

    c <- c - dual_lr * (e_measured - R)

where e_measured is the step's execution ratio decided as lm_eval decides (argmax votes over the
masked positions, a block skipped when their skip share is strictly above tau) on the step's own
forwards. The loss is the cross-entropy alone (CE / p_mask): its gradient teaches the routers
which rows and blocks need to run, and c sets how many do, as Mixture-of-Depths fixes a capacity
and lets the router rank. c acts on the decisions at once; a multiplier on a penalty term acts
through the optimizer's momentum and the hard vote thresholds, and on our measurements
(docs/routers-budget/) it wound up and overshot (the ratio fell to 0.17 for a target of 0.6 and
stayed there). c stays on the device (no read-back).

Training's hidden states (bf16 autocast, float32 routers, Gumbel noise upstream) are not quite
evaluation's, so at the end one further offset is chosen by bisection on the held-out forwards,
run as evaluation runs them (validate: the model's dtype, RoutedSkip), until their execution
ratio is within ``CALIBRATION_TOLERANCE`` of R.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..skipping.routers import EXECUTE, SKIP, Routers

log = logging.getLogger("lm_eval_dlmskip.train")

CALIBRATION_TOLERANCE = 0.005  # the search stops this close to R (the issue asks for 0.02 through lm_eval)
CALIBRATION_DRAWS = 16  # masked forwards per held-out example in the calibration (validation's 4 give a noisier
# ratio on a small held-out set: the mask ratio moves the execution ratio most)
CALIBRATION_STEPS = 16  # bisection halvings of the offset interval at most (16 / 2^16: 0.0002 of a logit)
OFFSET_RANGE = 16.0  # |c| searched; an execute-minus-skip logit shift of 16 flips any vote of a trained router


class DualAscent:
    """The budget's dual variable: the execute-logit offset c shared by every router, a device
    scalar, and the step that moves it (and the routers' biases with it)."""

    def __init__(self, target: float, lr: float, device: torch.device | str = "cpu", offset: float = 0.0) -> None:
        self.target = target
        self.lr = lr
        self.offset = torch.tensor(float(offset), device=device)

    def step(self, measured: Tensor) -> Tensor:
        """The change of c for one measured execution ratio (too many blocks run: c falls)."""
        return -self.lr * (measured.to(self.offset) - self.target)

    def update(self, measured: Tensor, routers: Routers) -> Tensor:
        """One ascent step on the measured execution ratio, applied to ``routers``; returns c."""
        change = self.step(measured)
        shift_execute_bias(routers, change)
        self.offset = self.offset + change
        return self.offset


@dataclass(frozen=True)
class Calibration:
    offset: float  # added to every router's execute logit bias
    ratio: float  # held-out execution ratio with it
    start_ratio: float  # held-out execution ratio before calibration
    evaluations: int  # held-out passes the search ran


def calibrate_offset(measure: Callable[[float], float], target: float, tolerance: float = CALIBRATION_TOLERANCE,
                     steps: int = CALIBRATION_STEPS, bound: float = OFFSET_RANGE) -> Calibration:
    """The execute-logit offset whose measured ratio is nearest ``target``: ``measure(0)`` first, then
    bisection on [-bound, 0] or [0, bound] (a larger offset runs more blocks), stopping within
    ``tolerance``. The ratio is a step function of the offset (decisions are discrete), so the
    best offset seen is returned, with its ratio."""
    start = measure(0.0)
    best = (abs(start - target), 0.0, start)
    evaluations = 1
    low, high = (-bound, 0.0) if start > target else (0.0, bound)
    for _ in range(steps):
        if best[0] <= tolerance:
            break
        middle = (low + high) / 2
        ratio = measure(middle)
        evaluations += 1
        best = min(best, (abs(ratio - target), middle, ratio), key=lambda b: (b[0], abs(b[1])))
        if ratio > target:
            high = middle
        else:
            low = middle
    return Calibration(best[1], best[2], start, evaluations)


def shift_execute_bias(routers: Routers, offset: float | Tensor) -> None:
    """Add ``offset`` to every router's execute logit (bias of its last layer), in place."""
    with torch.no_grad():
        for router in routers.routers:
            router.net[-1].bias[EXECUTE] += offset


def calibrated(routers: Routers, measure_routers: Callable[[Routers], float], target: float,
               on: str = "held-out forwards", tolerance: float = CALIBRATION_TOLERANCE) -> Calibration:
    """Shift ``routers`` in place by the offset ``calibrate_offset`` finds, measuring each offset
    with ``measure_routers`` on a shifted copy (``on`` says what it measures, for the log)."""
    def measure(offset: float) -> float:
        trial = copy.deepcopy(routers)
        shift_execute_bias(trial, offset)
        return measure_routers(trial)

    result = calibrate_offset(measure, target, tolerance)
    shift_execute_bias(routers, result.offset)
    log.info("calibrated the routers to --target-ratio %.3f on %s: execution ratio %.4f -> %.4f (execute-logit "
             "offset %+.4f, %d passes)", target, on, result.start_ratio, result.ratio, result.offset, result.evaluations)
    return result


def initial_skips(profile_order: list[int], n_layers: int, target: float | None, k: int | None) -> list[int]:
    """The blocks whose routers start skipping (sorted): the first ``k`` of a profile's choices,
    else, with a target ratio, as many as the budget skips (round((1 - R) n), at most all of its
    choices), else all of them."""
    if k is None:
        k = len(profile_order) if target is None else min(len(profile_order), round((1 - target) * n_layers))
    return sorted(profile_order[:k])


def start_skipping(routers: Routers, blocks: list[int]) -> None:
    """Flip the initial bias of these blocks' routers: skip wins by ``init_bias``, so training
    starts from the static set and the routers learn where it should not hold."""
    with torch.no_grad():
        for block in blocks:
            bias = routers.routers[block].net[-1].bias
            bias[SKIP], bias[EXECUTE] = 0.0, -routers.cfg.init_bias
