"""Skip decisions asked at every step of cached decoding (decide_every=step, issue 20 item 5): the
block's cache fill also writes the keys and values of the blocks a row skips, so a later window
forward may run a block the fill skipped. Measured reason (docs/routers-budget/cached.md): routers
that skip a block at the fill and want it back one step later lost 11 points of accuracy when the
fill's skip held for the whole block, with or without a cache.

References that share no code with the fix: a block's keys and values depend on its input only,
so those of a skipped block equal those a fill that ran it wrote (same input, the blocks before it
ran alike); skipping the last block changes no key or value at all, so a window forward after it
equals one after a fill that skipped nothing. conftest's ``nan_kv_cache`` starts each fill from NaN,
so a slot the fill did not write shows up as NaN."""

from __future__ import annotations

import pytest
import torch

from lm_eval_dlmskip.models.execution import KVCache
from lm_eval_dlmskip.skipping.flops import FlopsModel
from lm_eval_dlmskip.skipping.policies import NO_SKIP

from .conftest import MASK_ID
from .rows import padded

PROMPTS = [[17, 203, 88, 5, 142], [64, 9, 231, 120, 77, 33, 190, 2]]
GEN = 8


class RowSkip:
    """Batch row b skips the blocks ``skips[b]``."""

    def __init__(self, skips: list[set[int]]) -> None:
        self.skips = skips

    def rows_to_run(self, layer, h, batch):
        return torch.tensor([layer not in s for s in self.skips], device=h.device)


def canvas() -> tuple[torch.Tensor, torch.Tensor, slice]:
    ids, mask = padded(PROMPTS)
    ids = torch.cat([ids, torch.full((len(PROMPTS), GEN), MASK_ID)], 1)
    mask = torch.cat([mask, torch.ones(len(PROMPTS), GEN, dtype=torch.long)], 1)
    return ids, mask, slice(ids.shape[1] - GEN, None)


@pytest.mark.parametrize("skips", [[{2}, set()], [{2}, {2}]], ids=["one-row", "every-row"])
def test_a_fill_writes_the_keys_and_values_of_a_block_a_row_skips(ref_model, skips):
    """Block 2 skipped by one row (the per-row path, rows at their own rotary positions) or by all:
    its keys and values equal those of a fill that ran it, for every row; the fill's ``ran`` lets
    every row run it later, and the trace records which rows only wrote keys and values."""
    ids, mask, _ = canvas()
    skipped, full = KVCache(write_skipped=True), KVCache()
    with torch.no_grad():
        _, trace = ref_model(ids, mask, policy=RowSkip(skips), cache=skipped)
        ref_model(ids, mask, policy=NO_SKIP, cache=full)
    for layer in range(3):  # blocks 0 and 1 ran alike; block 2's input is the same
        torch.testing.assert_close(skipped.k[layer], full.k[layer], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(skipped.v[layer], full.v[layer], atol=1e-5, rtol=1e-5)
    assert skipped.ran == [True] * 6
    assert trace.executed[:, 2].tolist() == [2 not in s for s in skips]
    assert trace.kv_only.tolist() == [[i == 2 and i in s for i in range(6)] for s in skips]


def test_a_window_forward_runs_a_block_the_fill_skipped(ref_model):
    """Row 0 skips the last block in the fill (no key or value changes), then a window forward asks
    for every block: row 0 runs the last block, and both rows' logits equal those after a fill that
    skipped nothing (under the old rule row 0 kept skipping it there)."""
    ids, mask, window = canvas()
    skipped, full = KVCache(write_skipped=True), KVCache()
    with torch.no_grad():
        ref_model(ids, mask, policy=RowSkip([{5}, set()]), cache=skipped)
        ref_model(ids, mask, policy=NO_SKIP, cache=full)
        ours, trace = ref_model(ids, mask, policy=NO_SKIP, cache=skipped, window=window)
        theirs, _ = ref_model(ids, mask, policy=NO_SKIP, cache=full, window=window)
    assert trace.executed.all()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_keys_and_values_of_a_skipped_block_are_charged_their_projections(ref_model):
    """FLOPs of the fill: row 0 skipped block 2 and wrote its keys and values, so it is charged the
    K and V projections over its real tokens, 2 d (2 d_kv) each (d = 64, d_kv = 4 heads x 16 here),
    on top of what the same forward costs without them."""
    ids, mask, _ = canvas()
    with torch.no_grad():
        _, trace = ref_model(ids, mask, policy=RowSkip([{2}, set()]), cache=KVCache(write_skipped=True))
    flops = FlopsModel.of(ref_model.cfg)
    spent, _ = flops.forward(trace)
    without, _ = flops.forward(type(trace)(**{**trace.__dict__, "kv_only": None}))
    real_tokens = len(PROMPTS[0]) + GEN
    assert (spent - without).tolist() == [real_tokens * 2 * 64 * (2 * 64), 0.0]
