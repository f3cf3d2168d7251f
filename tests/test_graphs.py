"""The CUDA-graph runner is the same function as the model, decisions and trace included. (On a CPU
its graphs are their functions called directly: this checks the runner's control flow.)"""

from __future__ import annotations

import torch

from lm_eval_dlmskip.decoding.generate import GenerationSettings
from lm_eval_dlmskip.decoding.graphs import GraphRunner
from lm_eval_dlmskip.skipping.policies import NO_SKIP, RandomSkip, StaticSkip
from lm_eval_dlmskip.skipping.routers import RoutedSkip, RouterConfig, Routers

from .conftest import MASK_ID
from .rows import assert_same_forwards, decode, tiny_routers


def _routers(seed: int, keep: tuple[int, ...] = ()) -> Routers:
    torch.manual_seed(seed)
    routers = Routers(RouterConfig(d_model=64, n_layers=6, hidden=16, init_bias=0.0, keep=keep))
    for r in routers.routers:
        torch.nn.init.normal_(r.net[-1].weight, std=3.0)
    return routers


def test_runner_equals_the_model_for_every_policy(ref_model, ref_tensors):
    runner = GraphRunner(ref_model)
    ids = ref_tensors["forward.input_ids"].repeat(3, 1)
    ids[2, 4:9] = MASK_ID
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    policies = [NO_SKIP, StaticSkip({1, 4}), RandomSkip(2, 6, seed=3), RoutedSkip(_routers(0), 0.1),
                RoutedSkip(_routers(0, keep=(0, 3)), 0.1)]  # blocks 0 and 3 run without asking a router
    for policy in policies:
        for attention_mask in (None, mask):
            for logits_at in (None, slice(5, 11)):
                with torch.no_grad():
                    expected, expected_trace = ref_model(ids, attention_mask, policy=policy, logits_at=logits_at)
                for _ in range(2):  # the second call replays the graphs of the first
                    got, trace = runner(ids, attention_mask, policy=policy, logits_at=logits_at)
                    assert torch.allclose(got, expected, atol=1e-5), (policy, attention_mask is None, logits_at)
                    assert torch.equal(trace.executed, expected_trace.executed)
                    assert torch.equal(trace.head_positions, expected_trace.head_positions)
                    assert torch.equal(trace.masked, expected_trace.masked)
                    assert trace.routed_layers == expected_trace.routed_layers


def test_runner_follows_new_inputs_of_the_same_shape(ref_model):
    runner = GraphRunner(ref_model)
    routed = RoutedSkip(_routers(1), 0.1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, 240, (4, 10), generator=generator)
        ids[torch.rand(ids.shape, generator=generator) < 0.4] = MASK_ID
        with torch.no_grad():
            expected, expected_trace = ref_model(ids, policy=routed)
        got, trace = runner(ids, policy=routed)
        assert torch.allclose(got, expected, atol=1e-5)
        assert torch.equal(trace.executed, expected_trace.executed)
    mixed = trace.executed.float().mean(0)
    assert ((mixed > 0) & (mixed < 1)).any()  # rows disagreed somewhere: the subset path ran too


def test_runner_keeps_a_few_shapes(ref_model):
    runner = GraphRunner(ref_model, shapes=2)
    for L in (6, 7, 8, 6):
        runner(torch.randint(0, 240, (1, L)))
    assert list(runner.cache) == [(1, 8, False, None, "plain"), (1, 6, False, None, "plain")]


def test_runner_reads_each_batch_padding_on_replay(ref_model):
    """One shape, two padding patterns: a replay must attend with the current mask, not the first's."""
    runner = GraphRunner(ref_model)
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 240, (3, 12), generator=generator)
    ids[:, 6:] = MASK_ID
    first, second = torch.ones_like(ids), torch.ones_like(ids)
    first[0, :4], first[2, :1] = 0, 0
    second[1, :5], second[2, :2] = 0, 0
    for policy in [NO_SKIP, StaticSkip({2}), RandomSkip(2, 6, seed=1), RoutedSkip(_routers(2), 0.1)]:
        for mask in (first, second, first):
            with torch.no_grad():
                expected, expected_trace = ref_model(ids, mask, policy=policy)
            got, trace = runner(ids, mask, policy=policy)
            real = mask.bool()
            assert torch.allclose(got[real], expected[real], atol=1e-5), policy
            assert torch.equal(trace.executed, expected_trace.executed)


def test_one_runner_decodes_batches_of_one_shape_and_other_padding_as_the_model(ref_model):
    """What the GPU path does differently from the eager model, as far as a CPU can run it.

    Exercised here: every forward copies its inputs into the static buffers of its shape and the
    "graphs" (their functions, called directly) read only those buffers, so one runner decoding
    batches of one shape with other padding (and other tokens, hence other per-row decisions)
    must read each call's key mask, rotary tables, row keys and cache slots; the cache storage
    is lent by the runner and shared by the fill and window graphs of a shape (they must hold
    the same tensors, which conftest's NaN fill poisons before every fill); rows that disagree
    go through the eager subset path into the static hidden states; router decisions come back
    through the runner's host buffer.

    Not exercised on a CPU (tests/test_gpu_paths.py runs them on a GPU): real capture, where a
    graph replays the kernels and addresses recorded once, so anything a captured function reads
    outside the static buffers, or decides in Python, is frozen at capture (here it is re-run on
    every call); the asynchronous copy of decisions to pinned host memory and the stream
    synchronisation before reading it (synchronous here); the graphs' shared memory pool and
    warm-up on a side stream; the fallback to eager work after a failed capture; compiled blocks
    inside captured graphs; and numerics that differ by batch shape on GPU kernels."""
    runner = GraphRunner(ref_model)
    first = [[17, 203, 88, 5, 142], [64, 9, 231, 120, 77, 33, 190, 2], [111, 45, 222, 6, 198, 73, 150, 31, 99, 240],
             [3, 180, 57, 214, 92, 128, 11, 247, 66, 135, 40, 201]]
    second = [p[::-1] for p in reversed(first)]  # the same shape, each row padded otherwise
    policies = [RandomSkip(2, 6, seed=4), RoutedSkip(tiny_routers(2), 0.5)]
    for cache, decide_every in (("dual", "step"), ("prefix", "block")):
        settings = GenerationSettings(16, 16, 8, cache=cache, threshold=0.3, decide_every=decide_every)
        for policy in policies:
            for prompts in (first, second, first):
                expected, eager = decode(ref_model, policy, prompts, settings)
                got, replayed = decode(runner, policy, prompts, settings)
                assert torch.equal(got, expected), (cache, policy, prompts is first)
                assert_same_forwards(replayed, eager, atol=0.0)
    shapes = {key[:2] + key[3:] for key in runner.cache}
    assert (4, 28, 28, "fill") in shapes and (4, 8, 28, "window") in shapes
    [(k, v)] = [kv for shape, kv in runner.kv.items() if shape[3] == 28]
    for key, graphs in runner.cache.items():
        if key[3] == 28:
            assert graphs.ctx.cache.k is k and graphs.ctx.cache.v is v, key
