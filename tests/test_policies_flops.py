"""Skip policies decide what the papers describe; FLOPs are counted per task as they define them."""

from __future__ import annotations

import pytest
import torch

from lm_eval_dlmskip.models.config import LLaDAConfig
from lm_eval_dlmskip.skipping.flops import FlopsMeter, FlopsModel
from lm_eval_dlmskip.skipping.policies import ForwardBatch, RandomSkip, SkipTrace, StaticSkip, check_layers

from .conftest import MASK_ID


def test_static_skip_is_host_known():
    policy = StaticSkip([4, 6, 8])
    batch = ForwardBatch.of(torch.zeros(2, 3, dtype=torch.long), None, MASK_ID)
    assert [policy.rows_to_run(i, None, batch) for i in range(10)] == [i not in (4, 6, 8) for i in range(10)]


@pytest.mark.parametrize(
    "layers, message",
    [([40], r"skip_layers: 40 is out of range; blocks are 0-based, 0\.\.31 \(the papers number them 1\.\.32\)"),
     ([3, 3], "block 3 is listed twice"), ([-1], "-1 is out of range"), (["4"], "'4' is not a block index")],
)
def test_layer_errors_name_the_argument(layers, message):
    with pytest.raises(ValueError, match=message):
        check_layers(layers, 32, "skip_layers")


def test_random_skip_draws_k_blocks_per_row_reproducibly(ref_model, ref_tensors):
    ids = torch.randint(0, 240, (6, 10), generator=torch.Generator().manual_seed(0))
    policy = RandomSkip(2, 6, seed=5)
    _, trace = ref_model(ids, policy=policy)
    assert (trace.executed.sum(1) == 4).all()
    _, again = ref_model(ids, policy=policy)
    assert torch.equal(trace.executed, again.executed)
    assert len({tuple(r) for r in trace.executed.tolist()}) > 1  # rows draw different blocks
    _, other_seed = ref_model(ids, policy=RandomSkip(2, 6, seed=6))
    assert not torch.equal(trace.executed, other_seed.executed)


def test_random_skip_does_not_depend_on_padding_or_batch(ref_model):
    rows = [[5, 6, 7, 8, 9], [10, 11, 12]]
    padded = torch.tensor([[5, 6, 7, 8, 9], [251, 251, 10, 11, 12]])
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    policy = RandomSkip(3, 6, seed=1)
    _, together = ref_model(padded, mask, policy=policy)
    for i, row in enumerate(rows):
        _, alone = ref_model(torch.tensor([row]), policy=policy)
        assert together.executed[i].tolist() == alone.executed[0].tolist()


def test_random_skip_is_roughly_uniform_over_blocks():
    keys = ForwardBatch.of(torch.randint(0, 1000, (4000, 12), generator=torch.Generator().manual_seed(2)), None, MASK_ID)
    policy = RandomSkip(3, 8, seed=0)
    skipped = torch.stack([~policy.rows_to_run(i, None, keys) for i in range(8)], 1)
    assert (skipped.sum(1) == 3).all()
    share = skipped.float().mean(0)
    assert torch.allclose(share, torch.full((8,), 3 / 8), atol=0.03)


def test_random_skip_checks_k():
    with pytest.raises(ValueError, match="skip_random: 40 blocks cannot be drawn from 32"):
        RandomSkip(40, 32).check(32)


def test_rows_can_take_different_paths(ref_model, ref_tensors):
    """A per-row decision runs the block for some rows only; each row equals its own single run."""

    class EveryOtherRow:
        def rows_to_run(self, layer, h, batch):
            return torch.arange(h.shape[0]) % 2 == 0 if layer == 2 else True

    ids = ref_tensors["forward.input_ids"].repeat(2, 1)
    logits, trace = ref_model(ids, policy=EveryOtherRow())
    assert trace.executed[:, 2].tolist() == [True, False, True, False]
    assert torch.allclose(logits[0], ref_model(ids[:1])[0][0], atol=1e-5)
    assert torch.allclose(logits[1], ref_model(ids[1:2], policy=StaticSkip({2}))[0][0], atol=1e-5)


LLADA_8B = LLaDAConfig(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288,
                       vocab_size=126464, max_sequence_length=4096, mask_token_id=126336)


def _trace(executed_row, batch=1, n=512, head=256, routed_layers=0):
    executed = torch.tensor([executed_row] * batch)
    return SkipTrace(executed, torch.full((batch,), n), torch.full((batch,), head), torch.full((batch,), head), routed_layers)


def test_one_of_32_blocks_skipped_is_0_96875_on_the_papers_figure():
    meter = FlopsMeter(FlopsModel.of(LLADA_8B), torch.device("cpu"))
    index = meter.start(["gsm8k"])
    row = [True] * 32
    row[4] = False
    meter.record(_trace(row, batch=3), torch.full((3,), index["gsm8k"]))
    meter.flush()
    summary = meter.summary()["gsm8k"]
    assert summary["normalized_flops_papers"] == 0.96875
    assert summary["mean_executed_blocks"] == 31
    assert summary["block_execution_ratio"][4] == 0 and summary["block_execution_ratio"][5] == 1
    assert 0.96875 < summary["normalized_flops_whole_model"] < 1  # embedding and head are never skipped


def test_whole_model_flops_by_hand():
    flops = FlopsModel.of(LLADA_8B)
    n, d, f, V = 512, 4096, 12288, 126464
    block = n * (2 * d * 4 * d + 6 * d * f) + 4 * n * n * d
    spent, full = flops.forward(_trace([True] * 30 + [False] * 2, n=n, head=100))
    assert full.item() == 4 * d * n + 32 * block + 2 * d * V * 100
    assert spent.item() == 4 * d * n + 30 * block + 2 * d * V * 100
    # A LLaDA-8B block at 512 tokens is about 0.22 TFLOPs: 2 x 218M parameters x 512 tokens + attention.
    assert 0.2e12 < block < 0.25e12


@pytest.mark.parametrize("depth, per_token", [(2, 2 * (4096 * 512 + 512 * 2)), (4, 2 * (4096 * 512 + 2 * 512 * 512 + 512 * 2))])
def test_router_flops_by_hand(depth, per_token):
    """A router costs its matrix products at every position of every routed block:
    Linear(d, h) + (depth - 2) Linear(h, h) + Linear(h, 2), 2 FLOPs per multiply-add."""
    n, head = 512, 100
    plain, _ = FlopsModel.of(LLADA_8B).forward(_trace([True] * 30 + [False] * 2, n=n, head=head))
    routed = FlopsModel.of(LLADA_8B, router_hidden=512, router_depth=depth)
    spent, full = routed.forward(_trace([True] * 30 + [False] * 2, n=n, head=head, routed_layers=32))
    assert spent.item() - plain.item() == 32 * n * per_token
    assert full.item() == FlopsModel.of(LLADA_8B).forward(_trace([True] * 32, n=n, head=head))[1].item()


def test_meter_keeps_tasks_apart_and_merges_ranks():
    meter = FlopsMeter(FlopsModel.of(LLADA_8B), torch.device("cpu"))
    index = meter.start(["piqa", "arc"])
    meter.record(_trace([True] * 32, batch=2), torch.tensor([index["piqa"], index["arc"]]))
    meter.record(_trace([False] * 16 + [True] * 16, batch=1), torch.tensor([index["arc"]]))
    added = meter.flush()
    assert meter.summary()["piqa"]["normalized_flops_papers"] == 1.0
    assert meter.summary()["arc"]["normalized_flops_papers"] == 0.75
    assert meter.summary()["arc"]["forwards"] == 2
    meter.merge([added])  # as if a second rank had done the same work
    assert meter.summary()["arc"]["forwards"] == 4 and meter.summary()["arc"]["normalized_flops_papers"] == 0.75


def test_forwards_are_binned_by_the_masked_fraction_by_hand():
    """An answer of 10 tokens: 10 and 9 masked fall in the last bin [0.9, 1.0] (1.0 included),
    5 in [0.5, 0.6), 1 in [0.1, 0.2), none in [0, 0.1); each bin averages its own forwards' blocks."""
    meter = FlopsMeter(FlopsModel.of(LLADA_8B), torch.device("cpu"))
    index = meter.start(["t"])
    for masked, blocks in ((10, 32), (9, 30), (5, 20), (1, 8), (0, 4)):
        row = [True] * blocks + [False] * (32 - blocks)
        trace = SkipTrace(torch.tensor([row]), torch.tensor([20]), torch.tensor([10]), torch.tensor([masked]))
        meter.record(trace, torch.tensor([index["t"]]), answer_len=torch.tensor([10]))
    meter.flush()
    bins = {tuple(b["masked_fraction"]): (b["forwards"], b["mean_executed_blocks"])
            for b in meter.summary()["t"]["by_masked_fraction"]}
    assert bins == {(0.9, 1.0): (2, 31.0), (0.5, 0.6): (1, 20.0), (0.1, 0.2): (1, 8.0), (0.0, 0.1): (1, 4.0)}


def test_rank_zero_adds_the_other_ranks_once():
    """merge_ranks on rank 0: its own figures (gathered[0]) are in its totals already; the other
    ranks' are added once, and every task any rank touched is returned."""
    ranks = [FlopsMeter(FlopsModel.of(LLADA_8B), torch.device("cpu")) for _ in range(2)]
    gathered = []
    for meter, (task, batch) in zip(ranks, (("piqa", 3), ("arc", 2))):
        index = meter.start([task])
        meter.record(_trace([True] * 32, batch=batch), torch.full((batch,), index[task]))
        gathered.append([meter.flush()])
    assert ranks[0].merge_ranks(gathered) == {"piqa", "arc"}
    summary = ranks[0].summary()
    assert (summary["piqa"]["forwards"], summary["arc"]["forwards"]) == (3, 2)
