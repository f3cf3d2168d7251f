"""What only runs on a GPU (issue 16 item 6), skipped without CUDA: generation replayed from CUDA
graphs (GraphRunner), with blocks compiled by torch.compile (``model.compile_blocks()``) and
compiled routers (``RoutedSkip.compiled()``), against the eager model: token for token and forward
by forward (fill or window, the blocks each row ran, logits), for every cache mode x threshold x
decide_every x policy (none, static, random-k, routed), at batch 16 with mixed left padding and at
batch 1; every row of a batch of 16 against the row alone; bf16 replay against bf16 eager; and the
fallback to eager work after a failed capture.

One runner per engine serves every case of the module, as the harness keeps one: the second
padding layout of a batch replays the graphs of the first (static buffers reloaded with other
padding, tokens and per-row decisions), windows replay against the storage the fill wrote, and
per-row decisions come back through the pinned host copy. What tests/test_graphs.py cannot run
on a CPU is listed in its last test.

    PYTHONPATH=. python -m pytest -q tests/test_gpu_paths.py -k "not compiled"   # then -k compiled

The last run is recorded in bench/RESULTS.md.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from lm_eval_dlmskip.decoding.generate import GenerationSettings
from lm_eval_dlmskip.decoding.graphs import GraphRunner
from lm_eval_dlmskip.models.loading import load_llada
from lm_eval_dlmskip.skipping.policies import NO_SKIP, RandomSkip, StaticSkip
from lm_eval_dlmskip.skipping.routers import RoutedSkip

from .conftest import REFERENCE
from .rows import assert_rows_as_alone, assert_same_forwards, decode, random_prompts, tiny_routers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and compiled GPU kernels need a GPU")

DEVICE = "cuda"
FIRST = random_prompts(16, seed=0)  # 3 to 12 tokens each: every batch is left-padded
SECOND = [p[::-1] for p in reversed(FIRST)]  # the same shape, each row padded otherwise
CASES = [("none", t, "step") for t in (None, 0.3)] + [
    (cache, t, every) for cache in ("prefix", "dual") for t in (None, 0.3) for every in ("block", "step")
]
POLICIES = ("none", "static", "random", "routed")
ATOL = 1e-4  # float32 logits: another kernel (batch shape, compiled fusion) rounds otherwise


def settings_of(cache: str, threshold: float | None, decide_every: str) -> GenerationSettings:
    return GenerationSettings(16, 16, 8, cache=cache, threshold=threshold, decide_every=decide_every)


@pytest.fixture(scope="module")
def engines() -> SimpleNamespace:
    def load(dtype: str):
        return load_llada(str(REFERENCE), dtype=dtype, device=DEVICE).model

    eager, compiled, bf16 = load("float32"), load("float32").compile_blocks(), load("bfloat16")
    routers = tiny_routers(2, DEVICE)  # votes that split rows (see test_cache_rows)
    policies = {"none": NO_SKIP, "static": StaticSkip({1, 4}), "random": RandomSkip(2, 6, seed=4),
                "routed": RoutedSkip(routers, 0.5)}
    return SimpleNamespace(
        eager=eager, graphs=GraphRunner(eager, shapes=32), compiled=compiled, fast=GraphRunner(compiled, shapes=32),
        bf16=bf16, graphs_bf16=GraphRunner(bf16, shapes=32), policies=policies,
        compiled_policies={**policies, "routed": policies["routed"].compiled()},
    )


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("cache, threshold, decide_every", CASES)
def test_graphs_decode_as_eager_and_each_row_as_alone(engines, cache, threshold, decide_every, policy):
    settings, skip = settings_of(cache, threshold, decide_every), engines.policies[policy]
    for prompts in (FIRST, SECOND, SECOND[:1], SECOND[1:2]):
        expected, eager = decode(engines.eager, skip, prompts, settings, DEVICE)
        got, replayed = decode(engines.graphs, skip, prompts, settings, DEVICE)
        assert torch.equal(got, expected), len(prompts)
        assert_same_forwards(replayed, eager, ATOL)
        if prompts is SECOND:
            batch, batch_log = got, replayed
    for row, prompt in enumerate(SECOND):
        alone, alone_log = decode(engines.graphs, skip, [prompt], settings, DEVICE)
        assert torch.equal(alone[0], batch[row]), row
        assert_rows_as_alone(batch_log, row, alone_log, ATOL)
    assert engines.graphs.capture.enabled  # replayed from captured graphs, not fallen back to eager work


@pytest.mark.parametrize("cache, threshold, decide_every", CASES)
def test_bf16_graphs_decode_as_bf16_eager(engines, cache, threshold, decide_every):
    """The same kernels replayed: bf16 gives no more room than float32. (A row alone against the
    row in a batch is not compared in bf16: other matrix shapes round otherwise, and ties flip.)"""
    settings = settings_of(cache, threshold, decide_every)
    for name, skip in engines.policies.items():
        for prompts in (FIRST, SECOND, SECOND[:1]):
            expected, eager = decode(engines.bf16, skip, prompts, settings, DEVICE)
            got, replayed = decode(engines.graphs_bf16, skip, prompts, settings, DEVICE)
            assert torch.equal(got, expected), (name, len(prompts))
            assert_same_forwards(replayed, eager, ATOL)
    assert engines.graphs_bf16.capture.enabled


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("cache, threshold, decide_every", CASES)
def test_compiled_blocks_and_routers_decode_as_eager(engines, cache, threshold, decide_every, policy):
    """compile=True as the harness builds it: compiled blocks and routers, launched eagerly and
    replayed from graphs."""
    settings = settings_of(cache, threshold, decide_every)
    for prompts in (FIRST, SECOND, SECOND[:1]):
        expected, eager = decode(engines.eager, engines.policies[policy], prompts, settings, DEVICE)
        for forward in (engines.compiled, engines.fast):
            got, log = decode(forward, engines.compiled_policies[policy], prompts, settings, DEVICE)
            assert torch.equal(got, expected), (forward is engines.fast, len(prompts))
            assert_same_forwards(log, eager, ATOL)
    assert engines.fast.capture.enabled


class HostReadSkip:
    """Random-k decisions after a host read of the hidden states, which no CUDA graph can capture."""

    def __init__(self) -> None:
        self.inner = RandomSkip(2, 6, seed=4)

    def rows_to_run(self, layer, h, batch):
        if bool(h.isnan().any()):  # sync: refused while a stream is capturing
            raise AssertionError("NaN hidden states")
        return self.inner.rows_to_run(layer, h, batch)


def test_a_failed_capture_falls_back_to_eager_work(engines, caplog):
    """Last in the module: after a failed capture PyTorch's allocator starts no other one."""
    settings = settings_of("dual", 0.3, "step")
    runner = GraphRunner(engines.eager)
    expected, eager = decode(engines.eager, HostReadSkip(), SECOND, settings, DEVICE)
    with caplog.at_level(logging.WARNING, logger="lm_eval_dlmskip.decoding.graphs"):
        got, log = decode(runner, HostReadSkip(), SECOND, settings, DEVICE)
    assert "CUDA graph capture failed" in caplog.text
    assert not runner.capture.enabled
    assert torch.equal(got, expected)
    assert_same_forwards(log, eager, 0.0)
