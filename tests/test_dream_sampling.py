"""Dream's sampling against closed forms, and its schedule, confidences and likelihood against Dream's
own code (tests/fixtures/dream-reference: sampling.json, written by make_sampling_reference.py).

Statistical checks draw tens of thousands of samples in a few batched calls. Each would fail
truly random noise with probability at most 1e-6; ours is a counter-based hash of fixed row seeds,
so every run draws the same numbers and a check that passes once passes always."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lm_eval_dlmskip.decoding.dream import (
    DreamGenerationSettings,
    dream_generate,
    tokens_and_confidence,
    transfer_counts,
)
from lm_eval_dlmskip.decoding.likelihood import LikelihoodSettings, dream_masks, mc_loglikelihood
from lm_eval_dlmskip.decoding.noise import noise_keys
from lm_eval_dlmskip.models.loading import load_model

from .conftest import model_denoiser

DREAM = Path(__file__).parent / "fixtures" / "dream-reference"
MASK, EOS = 126, 127
FALSE_ALARM = 1e-6
Z = 5.33  # two-sided normal quantile at 1e-7: a handful of rate checks stay under FALSE_ALARM together

# Two constructed logit vectors over 10 tokens: distinct probabilities, ranks not in token order.
LOGITS_EVEN = [0.9, -1.4, 2.1, 0.1, -0.3, 1.6, -2.2, 0.5, 1.2, -0.8]
LOGITS_ODD = [-0.6, 1.8, -1.9, 0.3, 1.1, -0.2, 2.4, -1.1, 0.7, 0.0]


@pytest.fixture(scope="module")
def sampling_ref() -> dict:
    return json.loads((DREAM / "sampling.json").read_text())


@pytest.fixture(scope="module")
def sampling_tensors() -> dict[str, torch.Tensor]:
    return load_file(str(DREAM / "sampling.safetensors"))


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P(X >= observed) for Pearson's statistic of ``counts`` against ``probs`` (all > 0)."""
    expected = counts.sum() * probs.double()
    statistic = ((counts.double() - expected) ** 2 / expected).sum()
    df = torch.tensor((len(counts) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, statistic / 2))


def assert_distribution(draws: torch.Tensor, probs: torch.Tensor, what: str) -> None:
    """``draws`` (ints) come from ``probs``: none outside its support, and a chi-square test on it."""
    counts = torch.bincount(draws.flatten(), minlength=len(probs))
    support = probs > 0
    outside = counts[~support].sum()
    assert outside == 0, f"{what}: {int(outside)} draws outside the support {support.nonzero().flatten().tolist()}"
    p = chi_square_pvalue(counts[support], probs[support])
    expected = (probs * counts.sum()).round().tolist()
    assert p > FALSE_ALARM, f"{what}: p={p:.2e}, counts {counts.tolist()} vs expected {expected}"


def dream_distribution(logits: list[float], temperature: float, top_p: float | None, top_k: int | None) -> torch.Tensor:
    """Dream's sampling distribution from its definition: softmax(logits / temperature); top_p keeps
    the most likely tokens up to and including the one whose cumulative probability first exceeds
    top_p; top_k keeps the k largest logits; the kept probabilities renormalised."""
    p = (torch.tensor(logits, dtype=torch.float64) / temperature).softmax(0).tolist()
    order = sorted(range(len(p)), key=lambda v: -p[v])
    keep = set(order)
    if top_p is not None and top_p < 1:
        nucleus, mass = set(), 0.0
        for v in order:
            nucleus.add(v)
            mass += p[v]
            assert abs(mass - top_p) > 0.01, "constructed case too close to the nucleus boundary"
            if mass > top_p:
                break
        keep &= nucleus
    if top_k is not None:
        keep &= set(order[:top_k])
    q = torch.tensor([p[v] if v in keep else 0.0 for v in range(len(p))], dtype=torch.float64)
    return q / q.sum()


def constant_denoiser(per_position: torch.Tensor, calls: list | None = None):
    """A denoiser whose answer logits are ``per_position`` [G, V] in every row and step; ``calls``
    collects the answer part of the canvas it is shown at each forward."""

    def denoise(ids, attention_mask, logits_at):
        if calls is not None:
            calls.append(ids[:, logits_at].clone())
        return per_position.expand(ids.shape[0], -1, -1).clone()

    return denoise


# (temperature, top_p, top_k): each wrong temperature, top_k or nucleus size changes the support or the shape.
FILTERS = [(1.0, None, None), (0.5, None, None), (1.0, None, 3), (0.7, None, 5),
           (1.0, 0.6, None), (0.5, 0.93, None), (1.3, 0.8, 4), (1.0, 0.87, 6)]
# steps and alg_temp per algorithm: origin over several steps (its commits do not look at the tokens);
# maskgit_plus in one step (later steps would favour likely tokens); topk_margin and entropy over
# several steps, their confidences the same at every position (ties, or alg_temp's random order).
ALGORITHM_RUNS = [("origin", 2, 0.0), ("maskgit_plus", 1, 0.0), ("topk_margin", 2, 0.0), ("entropy", 2, 0.4)]


@pytest.mark.parametrize("temperature,top_p,top_k", FILTERS)
def test_sampled_tokens_follow_the_closed_form(temperature, top_p, top_k):
    """30,000 tokens per algorithm through dream_generate against softmax(logits / T) restricted to
    the nucleus and the top k, computed above from the definitions."""
    rows, G = 150, 200
    per_position = torch.tensor([LOGITS_EVEN, LOGITS_ODD]).repeat(G // 2, 1)  # [G, V]
    expected = [dream_distribution(v, temperature, top_p, top_k) for v in (LOGITS_EVEN, LOGITS_ODD)]
    prompt = torch.tensor([[3, 4]]).expand(rows, -1)
    for alg, steps, alg_temp in ALGORITHM_RUNS:
        settings = DreamGenerationSettings(gen_length=G, steps=steps, alg=alg, temperature=temperature, top_p=top_p,
                                           top_k=top_k, alg_temp=alg_temp)
        out = dream_generate(constant_denoiser(per_position), prompt, None, settings, MASK, torch.arange(rows) * 7 + 1)
        answer = out[:, 2:]
        assert not (answer == MASK).any()
        for parity in (0, 1):
            what = f"{alg} T={temperature} top_p={top_p} top_k={top_k}"
            assert_distribution(answer[:, parity::2], expected[parity], what)


def test_draws_are_independent_across_positions_and_rows():
    """Pairs of tokens (neighbouring positions; the same position in neighbouring rows) against the
    product of their marginals: noise shared between positions or rows shows here."""
    rows, G, temperature, top_k = 200, 250, 1.0, 4
    per_position = torch.tensor([LOGITS_EVEN]).expand(G, -1)
    q = dream_distribution(LOGITS_EVEN, temperature, None, top_k)
    support = q.nonzero().flatten()
    settings = DreamGenerationSettings(gen_length=G, steps=1, alg="maskgit_plus", temperature=temperature, top_k=top_k)
    out = dream_generate(constant_denoiser(per_position), torch.tensor([[3]]).expand(rows, -1), None, settings, MASK,
                         torch.arange(rows) + 100)[:, 1:]
    rank = torch.full((len(q),), -1).index_put_((support,), torch.arange(len(support)))
    r = rank[out]  # [rows, G] index within the support
    joint = (q[support][:, None] * q[support][None, :]).flatten()
    pairs = ((r[:, 0::2], r[:, 1::2], "neighbouring positions"), (r[0::2], r[1::2], "neighbouring rows"))
    for first, second, what in pairs:
        counts = torch.bincount((first * len(support) + second).flatten(), minlength=len(joint))
        p = chi_square_pvalue(counts, joint)
        assert p > FALSE_ALARM, f"{what}: p={p:.2e}"


def test_token_and_position_streams_of_different_rows_never_coincide():
    """Callers may key rows with consecutive seeds (0, 1, 2, ...; the tests here do): every (row
    seed, stream) must be a stream of its own, so no row's position noise repeats another row's
    token noise (64-bit keys: a chance coincidence among these 2 x 10^5 has probability ~1e-9)."""
    seeds, positions = torch.arange(1000), torch.arange(100)
    tokens, commits = noise_keys(seeds, 0, 3, positions), noise_keys(seeds, 1, 3, positions)
    assert not set(tokens.flatten().tolist()) & set(commits.flatten().tolist())


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_drawn_token_and_its_confidence(alg):
    """tokens_and_confidence alone, 60,000 draws: the token's law and maskgit_plus's confidence,
    the probability of the drawn token under the filtered distribution."""
    temperature, top_p, top_k = 0.8, 0.8, 6
    q = dream_distribution(LOGITS_ODD, temperature, top_p, top_k)
    logits = torch.tensor(LOGITS_ODD).expand(300, 200, -1)
    keys = noise_keys(torch.arange(300) + 5, 0, 2, torch.arange(200))
    settings = DreamGenerationSettings(alg=alg, temperature=temperature, top_p=top_p, top_k=top_k)
    x0, confidence = tokens_and_confidence(logits, settings, keys)
    assert_distribution(x0, q, alg)
    if alg == "maskgit_plus":
        assert torch.allclose(confidence.double(), q[x0], atol=1e-6)


def test_nucleus_keeps_tokens_until_the_mass_before_them_exceeds_top_p():
    """At an exact boundary: four probabilities of exactly 1/4; a token is dropped only once the
    tokens before it exceed top_p, so top_p 1/4 keeps two, 1/2 three, 3/4 all four (Dream's
    ``cumulative_probs > top_p``, shifted by one)."""
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0, -30.0, -30.0]]])
    for top_p, kept in ((0.25, 2), (0.5, 3), (0.75, 4)):
        _, confidence = tokens_and_confidence(logits, DreamGenerationSettings(alg="maskgit_plus", top_p=top_p), None)
        assert confidence.item() == pytest.approx(1 / kept), top_p


# Answer positions with distinct confidences under every algorithm (6 positions, 8 tokens).
POSITION_LOGITS = [
    [2.5, 0.1, -0.4, 0.3, -1.0, 0.0, 0.2, -0.3],
    [0.9, 0.8, 0.1, -0.5, 0.4, -0.2, 0.0, 0.3],
    [3.6, 1.0, 0.2, -0.8, 0.5, -0.1, 0.0, 0.1],
    [0.3, 0.2, 0.1, 0.0, -0.1, -0.2, 0.25, 0.15],
    [1.8, 1.7, -0.5, 0.0, -1.0, 0.2, 0.4, -0.2],
    [1.5, -0.5, -0.9, -1.5, 0.0, -0.6, -1.2, 0.3],
]


def dream_confidence(logits: list[float], alg: str) -> float:
    """Confidence from its definition: the top probability, the margin of the top two, or minus the entropy."""
    p = sorted(torch.tensor(logits, dtype=torch.float64).softmax(0).tolist(), reverse=True)
    if alg == "maskgit_plus":
        return p[0]
    if alg == "topk_margin":
        return p[0] - p[1]
    return sum(x * math.log(x) for x in p)


@pytest.mark.parametrize("alg,alg_temp", [("maskgit_plus", 0.25), ("topk_margin", 0.3), ("entropy", 0.5)])
def test_alg_temp_draws_positions_from_softmax_without_replacement(alg, alg_temp):
    """With alg_temp > 0 the first step's positions are a draw without replacement from
    softmax(confidence / alg_temp) over the masked positions: one pick (20,000 rows) against those
    weights, two picks against P({i, j}) = w_i w_j (1 / (1 - w_i) + 1 / (1 - w_j))."""
    rows, G = 20000, len(POSITION_LOGITS)
    w = (torch.tensor([dream_confidence(v, alg) for v in POSITION_LOGITS], dtype=torch.float64) / alg_temp).softmax(0)
    assert w.min() > 0.02 and w.max() < 0.6  # the case separates the weights without starving a position
    pairs = [(i, j) for i in range(G) for j in range(i + 1, G)]
    pair_probs = torch.tensor([w[i] * w[j] * (1 / (1 - w[i]) + 1 / (1 - w[j])) for i, j in pairs])
    for steps, picks in ((4, 1), (2, 2)):  # int(6 (1 - s/t)) at the first step
        calls = []
        settings = DreamGenerationSettings(gen_length=G, steps=steps, alg=alg, alg_temp=alg_temp)
        denoise = constant_denoiser(torch.tensor(POSITION_LOGITS), calls)
        prompt = torch.tensor([[5, 6, 7]]).expand(rows, -1)
        out = dream_generate(denoise, prompt, None, settings, MASK, torch.arange(rows) * 3 + steps)
        committed = (calls[0] == MASK) & (calls[1] == MASK).logical_not()  # [rows, G] after the first step
        assert (committed.sum(1) == picks).all() and not (out == MASK).any()
        if picks == 1:
            assert_distribution(committed.int().argmax(1), w, f"{alg} first pick")
        else:
            index = {pair: k for k, pair in enumerate(pairs)}
            chosen = committed.nonzero()[:, 1].view(rows, 2).tolist()
            assert_distribution(torch.tensor([index[tuple(c)] for c in chosen]), pair_probs, f"{alg} pairs")


def test_origin_commits_each_masked_position_with_probability_one_minus_s_over_t():
    """origin: at step i each still-masked position is committed with probability 1 - t_{i+1}/t_i
    (timesteps linspace(1, eps, steps + 1)), and the last step commits everything."""
    rows, G, steps, eps = 2500, 40, 5, 0.2
    calls = []
    settings = DreamGenerationSettings(gen_length=G, steps=steps, alg="origin", eps=eps)
    denoise = constant_denoiser(torch.tensor(LOGITS_EVEN).expand(G, -1), calls)
    out = dream_generate(denoise, torch.tensor([[1]]).expand(rows, -1), None, settings, MASK, torch.arange(rows) + 11)
    assert len(calls) == steps
    canvases = calls + [out[:, 1:]]
    t = [1 - i * (1 - eps) / steps for i in range(steps + 1)]
    for i in range(steps):
        masked = int((canvases[i] == MASK).sum())
        committed = masked - int((canvases[i + 1] == MASK).sum())
        if i == steps - 1:
            assert committed == masked
            continue
        p = 1 - t[i + 1] / t[i]
        assert abs(committed - masked * p) <= Z * math.sqrt(masked * p * (1 - p)), (i, committed / masked, p)


def schedule_denoiser(table: torch.Tensor, K: int, calls: list):
    """The fake model of make_sampling_reference.py: answer logits table[M % K, row], M the row's masks left."""

    def denoise(ids, attention_mask, logits_at):
        calls.append(ids[:, logits_at].clone())
        left = (ids == MASK).sum(1)
        return table[left % K, torch.arange(ids.shape[0]), : logits_at.stop - logits_at.start]

    return denoise


def test_greedy_steps_unmask_the_positions_dreams_sampler_unmasks(sampling_ref, sampling_tensors):
    """Dream's _sample on a fake model (fixture): per step as many positions as it unmasks
    (int(M (1 - s/t)), all left at the last step), the same positions, the same tokens."""
    spec, table = sampling_ref["schedule"], sampling_tensors["schedule.logits"]
    runs = spec["runs"]
    assert len(runs) >= 50 and {r["alg"] for r in runs} == {"maskgit_plus", "topk_margin", "entropy"}
    for run in runs:
        settings = DreamGenerationSettings(gen_length=run["gen_length"], steps=run["steps"], alg=run["alg"],
                                           eps=run["eps"], top_p=run.get("top_p"), top_k=run.get("top_k"))
        assert transfer_counts(run["gen_length"], run["steps"], run["eps"]) == run["counts"], run["counts"]
        calls = []
        prompt = torch.arange(1, 1 + spec["rows"] * spec["prompt_len"]).view(spec["rows"], spec["prompt_len"])
        out = dream_generate(schedule_denoiser(table, spec["K"], calls), prompt, None, settings, MASK)
        canvases = calls + [out[:, spec["prompt_len"]:]]
        ours = [[row.nonzero().flatten().tolist() for row in (a == MASK) & (b != MASK)]
                for a, b in itertools.pairwise(canvases)]
        # the steps that commit something, in order (ours skips the forward of a step that commits nothing)
        assert [s for s in ours if s[0]] == [s for s in run["unmasked"] if s[0]], run
        assert out[:, spec["prompt_len"]:].tolist() == run["output"]


def test_confidences_and_rankings_equal_dreams_sample_tokens(sampling_ref, sampling_tensors):
    logits = sampling_tensors["confidence.logits"]  # [N, V], nearly flat to peaked
    keys = noise_keys(torch.tensor([0]), 0, 0, torch.arange(len(logits)))
    cases = sampling_ref["confidence"]
    assert {c["alg"] for c in cases} == {"maskgit_plus", "topk_margin", "entropy"}
    for case in cases:
        settings = DreamGenerationSettings(alg=case["alg"], temperature=case["temperature"], top_p=case.get("top_p"),
                                           top_k=case.get("top_k"))
        x0, confidence = tokens_and_confidence(logits[None], settings, keys if case["temperature"] > 0 else None)
        theirs = torch.tensor(case["confidence"])
        assert torch.allclose(confidence[0], theirs, atol=1e-6, rtol=1e-5), case
        assert confidence[0].argsort(descending=True).tolist() == theirs.argsort(descending=True).tolist(), case
        if "x0" in case:
            assert x0[0].tolist() == case["x0"]


@pytest.fixture(scope="module")
def dream():
    return load_model(str(DREAM), dtype="float32").model


def test_likelihood_matches_dreams_estimator_on_more_cases(dream, sampling_ref):
    """Dream's _eval_target_nll_mc (fixture) at other mc_num and batch sizes, a one-token and a long
    answer: replaying its masks and probabilities, each sample's score and the mean match."""
    cases = sampling_ref["likelihood"]
    assert {len(c["answer"]) for c in cases} >= {2, 41} and len({(c["mc_batch"], c["mc_num"]) for c in cases}) >= 4
    for case in cases:
        masks, p_mask = torch.tensor(case["masks"], dtype=torch.bool), torch.tensor(case["p_mask"])
        assert not masks[:, -1].any() and len(masks) == case["mc_num"]
        n = len(masks)  # each sample a request of its own: one call scores them all
        one = LikelihoodSettings(mc_num=1, mc_batch=1, estimator="dream", sampling_eps=case["sampling_eps"])
        got = mc_loglikelihood(model_denoiser(dream), [case["prompt"]] * n, [case["answer"]] * n, one, MASK, EOS,
                               [None] * n, torch.device("cpu"),
                               masks=[(masks[i:i + 1], 1 / p_mask[i:i + 1]) for i in range(n)])
        assert got == pytest.approx([-s for s in case["per_sample"]], rel=1e-5, abs=1e-5)
        settings = LikelihoodSettings(mc_num=case["mc_num"], mc_batch=case["mc_batch"], estimator="dream",
                                      sampling_eps=case["sampling_eps"])
        got = mc_loglikelihood(model_denoiser(dream), [case["prompt"]], [case["answer"]], settings, MASK, EOS, [None],
                               torch.device("cpu"), masks=[(masks, 1 / p_mask)])
        assert got[0] == pytest.approx(-case["nll"], rel=1e-5)


def test_estimators_own_draws_are_weighted_by_one_over_p(dream):
    """Without replayed masks the estimator scores its own forward process with weight 1/p per
    sample: the same as replaying dream_masks' draws from an equal generator with 1/p weights."""
    prompt, answer = [17, 103, 88, 5], [12, 99, 4, 61, 23, EOS]
    settings = LikelihoodSettings(mc_num=16, mc_batch=8, estimator="dream")
    own = mc_loglikelihood(model_denoiser(dream), [prompt], [answer], settings, MASK, EOS,
                           [torch.Generator().manual_seed(9)], torch.device("cpu"))
    pattern, p_mask = dream_masks(len(answer), settings, torch.Generator().manual_seed(9))
    replayed = mc_loglikelihood(model_denoiser(dream), [prompt], [answer], settings, MASK, EOS, [None],
                                torch.device("cpu"), masks=[(pattern, 1 / p_mask)])
    assert own == pytest.approx(replayed, rel=1e-6)
    assert pattern.any(1).sum() >= 12  # most samples mask something, so the weights matter


def test_dream_masks_follow_the_forward_process_closely():
    """dream_masks against its definition over 8,192 samples: per group t_i = (u + i/b) mod 1 with u
    uniform, p = (1 - eps) t + eps; every answer token but the final EOS masked independently with
    probability p."""
    eps = 0.05
    settings = LikelihoodSettings(mc_num=8192, mc_batch=16, estimator="dream", sampling_eps=eps)
    pattern, p_mask = dream_masks(30, settings, torch.Generator().manual_seed(4))
    assert not pattern[:, -1].any()
    t = ((p_mask.double() - eps) / (1 - eps)).view(-1, 16)
    assert t.min() >= -1e-6 and t.max() < 1
    u = t[:, 0]  # the group's offset
    assert torch.allclose((t - u[:, None]) % 1, torch.arange(16, dtype=torch.float64) / 16, atol=1e-5)
    deciles = torch.bincount((u * 10).long().clamp(max=9), minlength=10)
    assert chi_square_pvalue(deciles, torch.full((10,), 0.1)) > FALSE_ALARM  # u uniform on [0, 1)
    m, p = pattern[:, :-1].double(), p_mask.double()[:, None].expand(-1, 29)
    for low, high in ((0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.01)):  # masking rate = p, at every p
        band = (p >= low) & (p < high)
        n_masked, expected, var = m[band].sum(), p[band].sum(), (p * (1 - p))[band].sum()
        assert abs(n_masked - expected) <= Z * math.sqrt(var), (low, high, float(n_masked), float(expected))
