"""Threshold and schedule edges against Fast-dLLM's own functions on constructed logits
(tests/fixtures/fastdllm-reference/edges.json): a confidence exactly at the threshold and one ulp
either side, steps where nothing reaches it, rows that finish a block at different steps, uneven
schedules and 0-token steps, ties, and the last block shorter than the others (refused)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lm_eval_dlmskip.decoding.generate import GenerationSettings, generate, transfer_schedule, unmask
from lm_eval_dlmskip.harness.gen_kwargs import resolve_generation

EDGES = json.loads((Path(__file__).parent / "fixtures" / "fastdllm-reference" / "edges.json").read_text())
PALETTE = EDGES["palette"]
MASK = EDGES["mask_token_id"]
PAD = 10  # a token no row decodes to, not the mask
CACHE_OF = {"generate": "none", "generate_with_prefix_cache": "prefix", "generate_with_dual_cache": "dual"}
CASES = EDGES["generate_cases"]


def logits_of(names: list[list[str]], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[B, W, V] logits from palette names."""
    return torch.tensor([[PALETTE[n] for n in row] for row in names], dtype=dtype)


class TableDenoiser:
    """Gives batch row r the constructed logits of case row ``rows[r]`` at (block, step, position),
    whatever else is in the batch: the block is the one the requested columns end in, the step
    how many forwards that block has had (every row of a batch starts a block together). Records
    the (block, step) of every call and the canvas each call saw."""

    def __init__(self, case: dict, rows: list[int], prompt_width: int) -> None:
        s = case["settings"]
        self.tables = [case["rows"][r]["table"] for r in rows]
        self.P, self.bl, self.dtype = prompt_width, s["block_length"], getattr(torch, case["dtype"])
        self.calls: list[list[int]] = []
        self.seen: list[torch.Tensor] = []
        self.steps = Counter()

    def name(self, row: int, block: int, step: int, position: int) -> str:
        j = position - self.P - block * self.bl
        if not 0 <= j < self.bl:
            return EDGES["outside"]
        steps = self.tables[row][block]
        return steps[step][j] if step < len(steps) else EDGES["done"]

    def __call__(self, ids, attention_mask, logits_at, cache=None, window=None):
        computed = range(ids.shape[1])[window if window is not None else slice(None)]
        positions = computed[logits_at if logits_at is not None else slice(None)]
        block = (positions[-1] - self.P) // self.bl
        step = self.steps[block]
        self.steps[block] += 1
        if step > self.bl + 1:  # at least one token per step: a block never needs more forwards
            raise AssertionError(f"block {block} is still not done after {step} forwards")
        self.calls.append([block, step])
        self.seen.append(ids.clone())
        names = [[self.name(r, block, step, p) for p in positions] for r in range(ids.shape[0])]
        return logits_of(names, self.dtype)


def settings_of(case: dict, cache: str) -> GenerationSettings:
    s = case["settings"]
    return GenerationSettings(s["gen_length"], s["steps"], s["block_length"], cache=cache, threshold=s["threshold"])


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def llada_fixed_steps(case: dict, function: str) -> bool:
    """cache=none without a threshold is upstream LLaDA's decoding: every scheduled step runs, 0-token
    steps included, where Fast-dLLM's generate stops a block once it has no mask left."""
    return CACHE_OF[function] == "none" and case["settings"]["threshold"] is None


RUNS = [(name, function) for name in CASES for function in CACHE_OF]


@pytest.mark.parametrize("case_name, function", RUNS)
def test_each_row_alone_decodes_as_fastdllm(case_name, function):
    """Batch 1: the same tokens, the same forwards (block, step), the same canvas after each forward."""
    case = CASES[case_name]
    s = case["settings"]
    for r, row in enumerate(case["rows"]):
        theirs = row["runs"][function]
        denoise = TableDenoiser(case, [r], len(row["prompt"]))
        out = generate(denoise, torch.tensor([row["prompt"]]), None, settings_of(case, CACHE_OF[function]), MASK)
        states = [x[0].tolist() for x in denoise.seen[1:]] + [out[0].tolist()]
        if "error" in theirs:  # their cached functions fail with one step per block; ours decode as their generate
            assert theirs["error"] == "IndexError" and s["steps"] == s["gen_length"] // s["block_length"]
            assert out[0].tolist() == row["runs"]["generate"]["output"]
            assert denoise.calls == [[b, i] for b in range(s["steps"]) for i in (0, 1)]  # the fill, then a 0-token window
            continue
        assert out[0].tolist() == theirs["output"], (case_name, function, r)
        if llada_fixed_steps(case, function):
            per_block = s["steps"] // (s["gen_length"] // s["block_length"])
            assert denoise.calls == [[b, i] for b in range(s["gen_length"] // s["block_length"]) for i in range(per_block)]
            ran = [denoise.calls.index(call) for call in theirs["calls"]]  # the 0-token steps change nothing
            assert [states[i] for i in ran] == theirs["x_after_call"]
        else:
            assert denoise.calls == theirs["calls"], (case_name, function, r)
            assert states == theirs["x_after_call"], (case_name, function, r)


@pytest.mark.parametrize("case_name, function", RUNS)
def test_a_padded_batch_decodes_every_row_as_fastdllm_alone(case_name, function):
    """Rows that finish a block at different steps share a batch (left-padded, in two orders): each
    decodes exactly as Fast-dLLM decodes it alone, and exactly as it decodes alone here; a finished
    row keeps its tokens while the others go on, and a block takes as many forwards as its slowest row."""
    case = CASES[case_name]
    rows = case["rows"]
    expected = [row["runs"][function].get("output", row["runs"]["generate"]["output"]) for row in rows]
    for order in (list(range(len(rows))), list(reversed(range(len(rows)))) * 2):
        prompts = [rows[r]["prompt"] for r in order]
        ids, mask = left_pad(prompts)
        denoise = TableDenoiser(case, order, ids.shape[1])
        out = generate(denoise, ids, mask, settings_of(case, CACHE_OF[function]), MASK)
        for b, r in enumerate(order):
            assert out[b, ids.shape[1]:].tolist() == expected[r][len(rows[r]["prompt"]):], (case_name, function, r)
        alone = [generate(TableDenoiser(case, [r], len(rows[r]["prompt"])), torch.tensor([rows[r]["prompt"]]), None,
                          settings_of(case, CACHE_OF[function]), MASK) for r in order]
        assert [a[0, len(p):].tolist() for a, p in zip(alone, prompts)] == out[:, ids.shape[1]:].tolist()
        if not llada_fixed_steps(case, function) and all("calls" in row["runs"][function] for row in rows):
            per_row = [Counter(b for b, _ in rows[r]["runs"][function]["calls"]) for r in order]
            assert Counter(b for b, _ in denoise.calls) == {b: max(c[b] for c in per_row) for b in per_row[0]}


def test_the_cases_cover_the_edges():
    """What the fixture is for: rows finishing blocks at different steps, steps committing nothing
    but the top token, all-at-once steps, uneven and 0-token schedules."""
    finish = {name: [[Counter(b for b, _ in row["runs"]["generate"]["calls"])[b] for b in range(2)]
                     for row in case["rows"]] for name, case in CASES.items() if case["settings"]["threshold"]}
    assert finish["threshold_exactly_half"] == [[3, 1], [1, 4], [2, 1]]
    assert finish["threshold_exactly_0.7"] == [[3, 1], [4, 1]]
    single = [t for case in CASES.values() for row in case["rows"] for t in row["runs"]["generate"]["transfers"]]
    assert {1, 3, 4} <= set(single)
    assert CASES["schedule_uneven"]["rows"][0]["runs"]["generate"]["transfers"] == [3, 3, 2]


def test_schedules_are_fastdllm_schedules():
    """Equal shares, the remainder to the first steps, 0-token steps last; per row of a batch, from
    that row's own mask count."""
    for case in EDGES["num_transfer_tokens"]:
        for count, theirs in zip(case["mask_counts"], case["num_transfer_tokens"]):
            assert transfer_schedule(count, case["steps"]) == theirs, (count, case["steps"])


@pytest.mark.parametrize("case", EDGES["transfer_index_batches"], ids=lambda c: c["what"][:40])
def test_unmask_on_a_batch_at_different_stages(case):
    """One step of a batch whose rows are mid-block, finished and untouched, as get_transfer_index
    takes it (their per-row loop gives each row what it gives that row alone). Ours shares one count
    over the batch; the rows Fast-dLLM gives fewer are the ones that have nothing left to commit."""
    start, end = case["block"]
    x = torch.tensor(case["x"])
    assert case["batched"]["x_after"] == [alone["x_after"][0] for alone in case["alone"]]
    threshold, counts = case["threshold"], case["num_transfer_tokens"]
    num_transfer = 0 if counts is None else max(counts)
    if counts is not None:
        masked = (x[:, start:end] == MASK).sum(1).tolist()
        assert all(k == num_transfer or m == 0 for k, m in zip(counts, masked))
    settings = GenerationSettings(8, 8, 4, cache="prefix", threshold=threshold)
    logits = logits_of([row[start:end] for row in case["logits"]])
    ours = unmask(x[:, start:end], logits, num_transfer, settings, MASK, None)
    assert ours.tolist() == [row[start:end] for row in case["batched"]["x_after"]]
    assert torch.equal(x[:, :start], torch.tensor(case["batched"]["x_after"])[:, :start])


@pytest.mark.parametrize("name", sorted(EDGES["transfer_index_ties"]))
def test_ties_commit_a_tied_position_whatever_the_prompt_length(name):
    """Ties: Fast-dLLM commits whichever tied position torch.topk lists first over the whole row, so its
    choice moves with the prompt length (recorded). Ours commits a position of the same confidence,
    the same one at every prompt length, alone or in a padded batch."""
    case = EDGES["transfer_index_ties"][name]
    block = case["block"]
    theirs = {tuple(run["committed_block_positions"]) for run in case["runs"]}
    assert len(theirs) > 1  # no rule of the block's contents alone reproduces their choice
    settings = GenerationSettings(8, 8, 4, cache="prefix", threshold=case["threshold"])
    current = torch.full((1, 4), MASK)
    ours = unmask(current, logits_of([block]), case["num_transfer_tokens"] or 0, settings, MASK, None)
    committed = [j for j in range(4) if ours[0, j] != MASK]
    for run in case["runs"]:
        assert sorted(block[j] for j in committed) == sorted(block[j] for j in run["committed_block_positions"])
    # through generate: the tied step, then one token per step (nothing reaches 0.9, or 1 scheduled)
    later = [[f"lo{a}:{t}" for a in (1, 1.5, 2, 0)] for t in (2, 3, 4)]
    steps = 4 if case["threshold"] else 3  # with no threshold: 2, 1, 1 tokens
    tie_case = {"settings": {"steps": steps, "gen_length": 4, "block_length": 4, "threshold": case["threshold"]},
                "dtype": "float64", "rows": [{"table": [[block] + later]}]}
    prompts = [[1] * n for n in (1, 5, 8, 12)]
    outputs = set()
    for cache in ("none", "prefix", "dual"):
        settings = settings_of(tie_case, cache)
        ids, mask = left_pad(prompts)
        batch = generate(TableDenoiser(tie_case, [0] * len(prompts), ids.shape[1]), ids, mask, settings, MASK)
        outputs |= {tuple(row) for row in batch[:, ids.shape[1]:].tolist()}
        for p in prompts:
            alone = generate(TableDenoiser(tie_case, [0], len(p)), torch.tensor([p]), None, settings, MASK)
            outputs.add(tuple(alone[0, len(p):].tolist()))
    assert len(outputs) == 1
    [answer] = outputs
    assert [j for j in range(4) if answer[j] == int(block[j].split(":")[1])] == committed


REFUSED = [case for case in EDGES["refusals"] if case["function"] == "generate" and "batch" not in case["what"]]


@pytest.mark.parametrize("case", REFUSED, ids=lambda c: c["what"][:40])
def test_what_fastdllm_refuses_is_refused_with_the_fix(case):
    """A last block shorter than the others cannot happen upstream: gen_length must be a multiple of
    block_length, and steps of the number of blocks (with a threshold too), or they fail an assert.
    Ours refuses the same settings before decoding, naming the lengths and the fix."""
    s = case["settings"]
    theirs = {c["function"]: c["error"] for c in EDGES["refusals"] if c["what"] == case["what"]}
    assert set(theirs.values()) == {"AssertionError"}, theirs
    settings = GenerationSettings(s["gen_length"], s["steps"], s["block_length"], threshold=s["threshold"])
    if s["gen_length"] % s["block_length"]:
        message = (f"gen_length={s['gen_length']} is not a multiple of block_length={s['block_length']}; "
                   "choose block_length dividing gen_length")
    else:
        message = f"steps={s['steps']} cannot be split evenly over {s['gen_length'] // s['block_length']} blocks"
    for cache in ("none", "prefix", "dual"):
        def never(*args, **kwargs):
            raise AssertionError("decoding started")

        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            generate(never, torch.tensor(case["prompt"]), None, replace(settings, cache=cache), MASK)
    user = {"gen_length": s["gen_length"], "steps": s["steps"], "block_length": s["block_length"], "threshold": s["threshold"]}
    with pytest.raises(ValueError, match=message.split(";")[0] + r".*\[settings and their sources: "):
        resolve_generation({"until": ["\n"]}, user)


def test_fastdllm_refuses_a_batch_where_ours_decodes_one():
    """Their functions build a one-row canvas, so a batch of prompts fails; the batch tests above are ours."""
    errors = {c["function"]: c["error"] for c in EDGES["refusals"] if "batch" in c["what"]}
    assert errors == {name: "RuntimeError" for name in CACHE_OF}
