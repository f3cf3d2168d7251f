"""The Monte-Carlo estimator agrees with the exact expectation of upstream's estimator, and it is
reproducible and independent of how requests are batched."""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter

import pytest
import torch

from lm_eval_dlmskip.decoding.likelihood import (
    LikelihoodSettings,
    greedy_matches,
    mc_loglikelihood,
    request_generator,
    sample_masks,
    stratified_counts,
)

from .conftest import EOS_ID, MASK_ID, greedy_answer, model_denoiser

CPU = torch.device("cpu")


def _estimate(model, prompts, answers, settings, seed=0):
    generators = [request_generator(seed, p, a) for p, a in zip(prompts, answers)]
    return mc_loglikelihood(model_denoiser(model), prompts, answers, settings, MASK_ID, EOS_ID, generators, CPU)


def test_every_case_is_within_three_standard_errors(ref, ref_model):
    """Independent groups of 16 stratified samples give an honest standard error."""
    for run in ref["cases"]["loglikelihood"]["runs"]:
        settings = LikelihoodSettings(mc_num=16, mc_batch=16, cfg=run["cfg_scale"])
        groups = [_estimate(ref_model, [run["prompt"]], [run["answer"]], settings, seed)[0] for seed in range(48)]
        mean = statistics.mean(groups)
        se = statistics.stdev(groups) / len(groups) ** 0.5
        expected = run["expected_loglik"]
        if len(run["answer"]) == 1:
            assert se == 0 and abs(mean - expected) < 1e-4
        else:
            assert abs(mean - expected) < 3 * se, (len(run["answer"]), mean, expected, se)


def test_one_token_answer_is_exact_with_one_sample(ref, ref_model):
    run = ref["cases"]["loglikelihood"]["runs"][0]
    assert len(run["answer"]) == 1
    for mc_num in (1, 128):
        value = _estimate(ref_model, [run["prompt"]], [run["answer"]], LikelihoodSettings(mc_num=mc_num))[0]
        assert abs(value - run["expected_loglik"]) < 1e-4


def test_stratified_counts_have_a_uniform_marginal():
    """For every slot of a group, l is uniform on 1..T over the group's random offset k.

    (Upstream's round(k + i T/b) with half-to-even rounding is not: for T=3, b=16 slot 8 takes
    l=2 for k=1 but l=1 for k=2 and k=3.)
    """
    for T in (2, 3, 4, 5, 7, 16, 40):
        settings = LikelihoodSettings(mc_num=16, mc_batch=16)
        by_k = {}
        for seed in range(400):
            counts = stratified_counts(T, settings, torch.Generator().manual_seed(seed))
            by_k[int(counts[0])] = counts
        assert sorted(by_k) == list(range(1, T + 1))
        per_slot = torch.stack([by_k[k] for k in sorted(by_k)])  # [T, 16]
        for slot in per_slot.T:
            assert sorted(slot.tolist()) == list(range(1, T + 1))


def _upstream_counts(T: int, b: int) -> list[int]:
    """How often upstream's rule gives each l in 1..T over every k in 1..T and slot i in 0..b-1
    (``forward_process`` of upstream ``get_log_likelihood.py``, with torch's half-to-even round)."""
    counts = [0] * T
    for k in range(1, T + 1):
        x = torch.round(torch.linspace(float(k), k + (b - 1) * (T / b), steps=b)).long()
        for l in (((x - 1) % T) + 1).tolist():
            counts[l - 1] += 1
    return counts


def test_the_docstring_quotes_upstreams_weights_and_ours_are_uniform():
    """The weights ``stratified_counts`` quotes for upstream's rounding (T=3, b=16) are what
    enumerating upstream's rule gives; ours give every l exactly b times over the k."""
    quoted = re.search(r"T=3, b=16 gives l=1,2,3 with weights\s+(\d+):(\d+):(\d+)", stratified_counts.__doc__)
    assert quoted is not None
    assert [int(w) for w in quoted.groups()] == _upstream_counts(3, 16) == [17, 16, 15]
    settings = LikelihoodSettings(mc_num=16, mc_batch=16)
    by_k = {}
    for seed in range(200):
        counts = stratified_counts(3, settings, torch.Generator().manual_seed(seed))
        by_k[int(counts[0])] = counts.tolist()
    assert sorted(by_k) == [1, 2, 3]
    assert Counter(l for counts in by_k.values() for l in counts) == {1: 16, 2: 16, 3: 16}


def test_masks_have_the_stratified_sizes(ref_model):
    settings = LikelihoodSettings(mc_num=32, mc_batch=16)
    pattern, count = sample_masks(6, settings, torch.Generator().manual_seed(1))
    assert pattern.shape == (32, 6) and torch.equal(pattern.sum(1), count)
    assert count.min() >= 1 and count.max() <= 6
    assert len(set(count[:16].tolist())) == 6  # one group spans every size


def _recording_denoiser(seen: list, vocab: int = 256):
    """Uniform logits (every masked token costs log V); keeps the ids of every forward."""

    def denoise(ids, attention_mask, logits_at):
        seen.append(ids.clone())
        return torch.zeros(len(logits_at), vocab)

    return denoise


@pytest.mark.parametrize("cfg", [0.0, 0.5])
def test_the_prompt_is_never_masked(cfg):
    """Every row carries its request's prompt intact and masks only answer positions; with CFG the
    unconditional half masks the whole prompt and nothing else changes."""
    prompts, answers = [[11, 12, 13, 14], [21, 22]], [[5, 6, 7, 8, 9], [30, 31, 32]]
    seen = []
    generators = [request_generator(0, p, a) for p, a in zip(prompts, answers)]
    settings = LikelihoodSettings(mc_num=32, mc_batch=16, cfg=cfg)
    mc_loglikelihood(_recording_denoiser(seen), prompts, answers, settings, MASK_ID, EOS_ID, generators, CPU)
    assert len(seen) == 2
    for ids in seen:
        conditional, unconditional = ids.chunk(2) if cfg else (ids, None)
        assert len(conditional) == 32  # 16 samples of each request per round
        for r, (prompt, answer) in enumerate(zip(prompts, answers)):
            rows = conditional[16 * r : 16 * (r + 1), : len(prompt) + len(answer)]
            assert (rows[:, : len(prompt)] == torch.tensor(prompt)).all()
            masked = rows[:, len(prompt) :] == MASK_ID
            assert masked.any(1).all() and (rows[:, len(prompt) :][~masked] == torch.tensor(answer).expand_as(masked)[~masked]).all()
            if cfg:
                un = unconditional[16 * r : 16 * (r + 1), : len(prompt) + len(answer)]
                assert (un[:, : len(prompt)] == MASK_ID).all() and torch.equal(un[:, len(prompt) :], rows[:, len(prompt) :])


def test_each_sample_is_weighted_by_t_over_l():
    """With uniform logits a masked token costs log V, so a sample of l masks scores l log V and,
    weighted by T / l, every sample gives T log V: the estimate is exact whatever l was drawn."""
    prompts, answers = [[11, 12, 13, 14], [21, 22]], [[5, 6, 7, 8, 9], [30, 31, 32]]
    for seed in range(3):
        generators = [request_generator(seed, p, a) for p, a in zip(prompts, answers)]
        got = mc_loglikelihood(_recording_denoiser([]), prompts, answers, LikelihoodSettings(mc_num=32), MASK_ID, EOS_ID, generators, CPU)
        assert got == pytest.approx([-5 * math.log(256), -3 * math.log(256)], rel=1e-6)


def test_batched_requests_equal_requests_alone(ref, ref_model):
    runs = ref["cases"]["loglikelihood"]["runs"][:4]
    prompts, answers = [r["prompt"] for r in runs], [r["answer"] for r in runs]
    settings = LikelihoodSettings(mc_num=32, mc_batch=16)
    together = _estimate(ref_model, prompts, answers, settings)
    alone = [_estimate(ref_model, [p], [a], settings)[0] for p, a in zip(prompts, answers)]
    assert together == pytest.approx(alone, abs=1e-4)
    assert _estimate(ref_model, prompts[::-1], answers[::-1], settings) == pytest.approx(together[::-1], abs=1e-4)


def test_seeded_and_reproducible(ref, ref_model):
    run = ref["cases"]["loglikelihood"]["runs"][2]
    settings = LikelihoodSettings(mc_num=16)
    first = _estimate(ref_model, [run["prompt"]], [run["answer"]], settings, seed=7)
    assert _estimate(ref_model, [run["prompt"]], [run["answer"]], settings, seed=7) == first
    assert _estimate(ref_model, [run["prompt"]], [run["answer"]], settings, seed=8) != first


def test_forwards_carry_rows_of_many_requests(ref, ref_model):
    runs = ref["cases"]["loglikelihood"]["runs"][:3]
    shapes = []

    def denoise(ids, attention_mask, logits_at):
        shapes.append(ids.shape[0])
        return ref_model(ids, attention_mask, logits_at=logits_at)[0]

    prompts, answers = [r["prompt"] for r in runs], [r["answer"] for r in runs]
    generators = [request_generator(0, p, a) for p, a in zip(prompts, answers)]
    mc_loglikelihood(denoise, prompts, answers, LikelihoodSettings(mc_num=32, mc_batch=16), MASK_ID, EOS_ID, generators, CPU)
    assert shapes == [1 + 16 + 16, 16 + 16]  # the one-token answer needs one row, once


def test_settings_errors():
    with pytest.raises(ValueError, match="mc_num=100 is not a multiple of mc_batch=16"):
        LikelihoodSettings(mc_num=100).check()
    with pytest.raises(ValueError, match="mc_num=0"):
        LikelihoodSettings(mc_num=0).check()


def test_greedy_check_recognises_the_models_own_greedy_answer(ref_model):
    prompts = [[11, 12, 13, 14], [40, 41, 42]]
    denoise = model_denoiser(ref_model)
    answers = [greedy_answer(denoise, prompt, 4) for prompt in prompts]
    assert greedy_matches(denoise, prompts, answers, 0.0, MASK_ID, EOS_ID, CPU) == [True, True]
    wrong = [answers[0], [(t + 1) % 240 for t in answers[1]]]
    assert greedy_matches(denoise, prompts, wrong, 0.0, MASK_ID, EOS_ID, CPU) == [True, False]


def test_guided_estimate_of_a_padded_batch_by_hand(ref_model):
    """With cfg > 0 each masked position scores un + (cfg + 1)(cond - un), where the unconditional
    logits come from the same row with its prompt masked as well (LLaDA's unsupervised CFG). Given
    the masks, the estimate of each request of a padded batch equals that computed row by row with
    full forwards of the row alone: minus the mean over samples of weight x summed CE."""
    cfg = 0.5
    prompts, answers = [[5, 6, 7, 8], [20, 21]], [[9, 10, 11], [30, 31]]
    masks = [(torch.tensor([[True, False, True], [False, True, False]]), torch.tensor([1.5, 3.0])),
             (torch.tensor([[True, True], [True, False]]), torch.tensor([1.0, 2.0]))]
    settings = LikelihoodSettings(mc_num=2, mc_batch=2, cfg=cfg)
    got = mc_loglikelihood(model_denoiser(ref_model), prompts, answers, settings, MASK_ID, EOS_ID, [None, None], CPU,
                           masks=masks)
    for prompt, answer, (patterns, weights), value in zip(prompts, answers, masks, got):
        scores = []
        for pattern, weight in zip(patterns, weights):
            masked = [False] * len(prompt) + pattern.tolist()
            row = torch.tensor([[MASK_ID if m else t for t, m in zip(prompt + answer, masked)]])
            unconditional = torch.tensor([[MASK_ID] * len(prompt) + row[0, len(prompt):].tolist()])
            with torch.no_grad():
                cond, un = ref_model(row)[0][0], ref_model(unconditional)[0][0]
            mixed = un + (cfg + 1) * (cond - un)
            where = torch.tensor(masked).nonzero().squeeze(1)
            targets = torch.tensor(prompt + answer)[where]
            scores.append(weight.item() * torch.nn.functional.cross_entropy(mixed[where], targets, reduction="sum").item())
        assert value == pytest.approx(-sum(scores) / len(scores), rel=1e-5)


@pytest.mark.parametrize("T, b", [(3, 16), (5, 4), (7, 16), (6, 4)])
def test_stratified_counts_are_k_plus_i_t_over_b_rounded_half_up(T, b):
    """The documented rule, slot by slot: l_i = k + round(i T / b) wrapped into 1..T, halves rounded
    up (exact fractions here); k is slot 0's count."""
    from fractions import Fraction

    settings = LikelihoodSettings(mc_num=4 * b, mc_batch=b)
    counts = stratified_counts(T, settings, torch.Generator().manual_seed(T * b)).view(4, b).tolist()
    for group in counts:
        k = group[0]
        assert group == [(k - 1 + math.floor(Fraction(i * T, b) + Fraction(1, 2))) % T + 1 for i in range(b)]
