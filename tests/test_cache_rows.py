"""Per-row skipping under the KV cache (issue 16 item 2): a padded batch whose rows take different
skip decisions decodes every row as that row decoded alone with the same decisions (token for
token; per forward the same blocks run and the same logits), for every cache mode, with and
without a threshold, decisions taken per block or per step; and a cache slot that a fill did not
write is never read. conftest's ``nan_kv_cache`` makes every fill start from NaN keys and values,
so such a read turns the answer NaN (the first test shows it does)."""

from __future__ import annotations

import pytest
import torch

from lm_eval_dlmskip.decoding.generate import GenerationSettings
from lm_eval_dlmskip.decoding.graphs import GraphRunner
from lm_eval_dlmskip.models import execution
from lm_eval_dlmskip.models.execution import KVCache
from lm_eval_dlmskip.skipping.policies import NO_SKIP, RandomSkip
from lm_eval_dlmskip.skipping.routers import RoutedSkip

from .conftest import MASK_ID
from .rows import ProgressSkip, assert_rows_as_alone, decode, padded, tiny_routers

PROMPTS = [[17, 203, 88, 5, 142], [64, 9, 231, 120, 77, 33, 190, 2], [111, 45, 222, 6, 198, 73, 150, 31, 99, 240],
           [3, 180, 57, 214, 92, 128, 11, 247, 66, 135, 40, 201]]
ATOL = 1e-4  # float32 logits of a row alone and in a padded batch (other positions, other matmul shapes)


class RowSkip:
    """Batch row b skips the blocks ``skips[b]`` (a test policy for one batch layout)."""

    def __init__(self, skips: list[set[int]]) -> None:
        self.skips = skips

    def rows_to_run(self, layer, h, batch):
        return torch.tensor([layer not in s for s in self.skips], device=h.device)


@pytest.mark.parametrize("runner", [False, True], ids=["eager", "graphs"])
def test_a_stale_read_of_the_cache_turns_the_row_nan(ref_model, runner):
    """The guard of every test here: row 0 skips block 2 in the fill, then a window forward is made
    to believe it ran it (``ran`` rewritten by hand). Reading the K/V it never wrote turns row 0
    NaN; row 1, which wrote them, stays finite and equals the honest window forward."""
    forward = GraphRunner(ref_model) if runner else ref_model
    ids, mask = padded(PROMPTS[:2])
    ids = torch.cat([ids, torch.full((2, 8), MASK_ID)], 1)
    mask = torch.cat([mask, torch.ones(2, 8, dtype=torch.long)], 1)
    window = slice(ids.shape[1] - 8, None)
    honest, planted = KVCache(), KVCache()
    for cache in (honest, planted):
        with torch.no_grad():
            forward(ids, mask, policy=RowSkip([{2}, set()]), cache=cache)
        assert cache.ran[2] == [False, True]
    planted.ran[2] = True
    with torch.no_grad():
        stale, _ = forward(ids, mask, policy=NO_SKIP, cache=planted, window=window)
        assert stale[0].isnan().all() and stale[1].isfinite().all()
        forward(ids, mask, policy=RowSkip([{2}, set()]), cache=honest)  # refill (the runner lends one storage)
        fine, trace = forward(ids, mask, policy=NO_SKIP, cache=honest, window=window)
    assert fine.isfinite().all()
    assert trace.executed.tolist() == [[True, True, False, True, True, True], [True] * 6]
    assert torch.equal(fine[1], stale[1])


def policies() -> dict:
    return {"random": RandomSkip(2, 6, seed=4), "routed": RoutedSkip(tiny_routers(2), 0.5)}


CASES = [("none", t, "step") for t in (None, 0.3)] + [
    (cache, t, every) for cache in ("prefix", "dual") for t in (None, 0.3) for every in ("block", "step")
]


@pytest.mark.parametrize("policy", ["random", "routed"])
@pytest.mark.parametrize("cache, threshold, decide_every", CASES)
def test_each_row_of_a_padded_batch_decodes_as_alone(ref_model, cache, threshold, decide_every, policy):
    """Rows of mixed prompt lengths take different skip decisions; each decodes as alone, and in
    every window forward runs exactly the blocks the rule allows: what the policy asks, a block the
    fill skipped included, since the fill wrote its keys and values (decide_every=step), or the fill's
    blocks (decide_every=block)."""
    settings = GenerationSettings(16, 16, 8, cache=cache, threshold=threshold, decide_every=decide_every)
    skip = policies()[policy]
    out, batch = decode(ref_model, skip, PROMPTS, settings, ask=True)
    for f in batch.forwards:
        assert f.logits.isfinite().all()
    for row, prompt in enumerate(PROMPTS):
        answer, alone = decode(ref_model, skip, [prompt], settings, ask=True)
        assert out[row].tolist() == answer[0].tolist(), row
        assert_rows_as_alone(batch, row, alone, ATOL)

    assert any((f.executed != f.executed[:1]).any() for f in batch.forwards if f.fill)  # rows parted in a fill
    if cache == "none":
        return
    fill = None
    exercised = False  # a window forward where the policy asked a row to run a block it skipped in the fill
    for f in batch.forwards:
        if f.fill:
            fill = f.executed
            continue
        if decide_every == "block":
            assert f.asked is None and torch.equal(f.executed, fill)
        else:
            assert torch.equal(f.executed, f.asked)
            exercised |= bool((f.asked & ~fill).any())
    assert exercised == (decide_every == "step")


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_rows_that_agree_on_every_block_take_the_fast_path(ref_model, cache, monkeypatch):
    """ProgressSkip answers per row, but under the fixed schedule every row agrees on every block:
    no block may go through the per-row subset path, and each row still decodes as alone. Under a
    threshold the same policy splits the rows (in full forwards, and in window forwards that ask
    it), and the subset path is seen to run."""
    subsets = []
    run_block = execution.run_block

    def spy(block, layer, x, run, ctx):
        subsets.append(isinstance(run, list))
        return run_block(block, layer, x, run, ctx)

    monkeypatch.setattr(execution, "run_block", spy)
    for threshold in (None, 0.3):
        subsets.clear()
        settings = GenerationSettings(16, 16, 8, cache=cache, threshold=threshold, decide_every="step")
        out, batch = decode(ref_model, ProgressSkip(), PROMPTS, settings)
        assert (not any(subsets)) == (threshold is None), threshold
        assert not all(f.executed.all() for f in batch.forwards)  # blocks were skipped
        for row, prompt in enumerate(PROMPTS):
            answer, _ = decode(ref_model, ProgressSkip(), [prompt], settings)
            assert out[row].tolist() == answer[0].tolist()
