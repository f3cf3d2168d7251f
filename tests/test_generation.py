"""Diffusion decoding is token-identical with upstream generate() and independent of batch size."""

from __future__ import annotations

import pytest
import torch

from lm_eval_dlmskip.decoding.generate import GenerationSettings, add_gumbel_noise, generate, transfer_schedule
from lm_eval_dlmskip.decoding.noise import noise_keys

from .conftest import EOS_ID, MASK_ID, model_denoiser


def _settings(raw: dict) -> GenerationSettings:
    return GenerationSettings(
        gen_length=raw["gen_length"], steps=raw["steps"], block_length=raw["block_length"], cfg=raw.get("cfg_scale", 0.0)
    )


def test_every_fixture_case_is_token_identical(ref, ref_model):
    runs = ref["cases"]["generate"]["runs"]
    denoise = model_denoiser(ref_model)
    for run in runs:
        if "prompt" in run:
            out = generate(denoise, torch.tensor([run["prompt"]]), None, _settings(run["settings"]), MASK_ID)
            assert out[0].tolist() == run["output"], run["settings"]
        else:
            out = generate(
                denoise, torch.tensor(run["prompt_batch"]), torch.tensor(run["attention_mask"]),
                _settings(run["settings"]), MASK_ID,
            )
            assert out.tolist() == run["output_batch"]


def _left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[EOS_ID] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    return ids, None if bool(mask.all()) else mask


@pytest.mark.parametrize("settings", [GenerationSettings(16, 16, 4), GenerationSettings(8, 4, 8, cfg=0.5)])
def test_batch_of_four_equals_one_at_a_time(ref, ref_model, settings):
    prompts = [run["prompt"] for run in ref["cases"]["generate"]["runs"] if "prompt" in run][:4]
    assert len({len(p) for p in prompts}) > 1  # rows of different length: padding is exercised
    denoise = model_denoiser(ref_model)
    ids, mask = _left_pad(prompts)
    batched = generate(denoise, ids, mask, settings, MASK_ID)
    P = ids.shape[1]
    for row, prompt in zip(batched, prompts):
        alone = generate(denoise, torch.tensor([prompt]), None, settings, MASK_ID)
        assert row[P:].tolist() == alone[0, len(prompt):].tolist()


def test_transfer_schedule_spreads_the_remainder_first():
    assert transfer_schedule(8, 8) == [1] * 8
    assert transfer_schedule(10, 4) == [3, 3, 2, 2]
    assert sum(transfer_schedule(256, 256)) == 256


def _upstream_num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """Upstream generate.py ``get_num_transfer_tokens``, copied: equal shares, the remainder added
    to the first steps."""
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    num_transfer_tokens = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        num_transfer_tokens[i, : remainder[i]] += 1
    return num_transfer_tokens


@pytest.mark.parametrize("gen_length, block_length, steps", [(5, 5, 2), (7, 7, 3), (12, 6, 8), (10, 5, 6)])
def test_uneven_steps_commit_what_upstream_commits(gen_length, block_length, steps):
    """When the steps of a block do not divide its length, each step of ``generate`` commits the
    count upstream's get_num_transfer_tokens gives for that block's masks."""
    masked_before = []

    def denoise(ids, attention_mask, logits_at):
        masked_before.append(int((ids == 9).sum()))
        return torch.randn(ids.shape[0], ids[:, logits_at].shape[1], 9)

    generate(denoise, torch.tensor([[1, 2, 3]]), None, GenerationSettings(gen_length, steps, block_length), 9)
    per_block = steps // (gen_length // block_length)
    block_masks = torch.ones(1, block_length, dtype=torch.bool)
    expected = _upstream_num_transfer_tokens(block_masks, per_block)[0].tolist() * (gen_length // block_length)
    committed = [a - b for a, b in zip(masked_before, masked_before[1:] + [0])]
    assert committed == expected


def test_fake_denoiser_commits_most_confident_first():
    """A denoiser that is surest about the last position fills the block from the right."""
    V, order = 10, []

    def denoise(ids, attention_mask, logits_at):
        order.append((ids[0] == MASK).nonzero().squeeze(1).tolist())
        W = ids[:, logits_at].shape[1]
        logits = torch.zeros(ids.shape[0], W, V)
        logits[:, :, 3] = torch.arange(W, dtype=torch.float) + 1.0  # later columns more confident
        return logits

    MASK = 9
    out = generate(denoise, torch.tensor([[1, 2]]), None, GenerationSettings(4, 4, 4), MASK)
    assert out.tolist() == [[1, 2, 3, 3, 3, 3]]
    assert order == [[2, 3, 4, 5], [2, 3, 4], [2, 3], [2]]


def test_semi_autoregressive_blocks_never_touch_later_blocks():
    seen = []

    def denoise(ids, attention_mask, logits_at):
        seen.append((logits_at, (ids == 9).sum().item()))
        W = ids[:, logits_at].shape[1]
        return torch.randn(ids.shape[0], W, 9)

    out = generate(denoise, torch.tensor([[1, 2, 3]]), None, GenerationSettings(6, 6, 2), 9)
    assert (out != 9).all()
    windows = [w for w, _ in seen]
    assert windows[:2] == [slice(3, 5)] * 2 and windows[2:4] == [slice(5, 7)] * 2 and windows[4:] == [slice(7, 9)] * 2
    assert [m for _, m in seen] == [6, 5, 4, 3, 2, 1]


@pytest.mark.parametrize(
    "settings, message",
    [
        (GenerationSettings(gen_length=10, steps=10, block_length=4), "not a multiple of block_length=4"),
        (GenerationSettings(gen_length=8, steps=3, block_length=4), "steps=3 cannot be split evenly over 2 blocks"),
        (GenerationSettings(gen_length=8, steps=8, block_length=8, remasking="top_p"), "remasking='top_p'"),
        (GenerationSettings(gen_length=0, steps=8, block_length=8), "gen_length=0"),
    ],
)
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        settings.check()


def test_random_remasking_and_temperature_are_seeded_and_sample(ref, ref_model):
    """A row's noise is a function of its seed: the same seed decodes the same text, alone or in a
    padded batch; another seed decodes other text; and the sampler departs from greedy decoding."""
    denoise = model_denoiser(ref_model)
    prompts = [run["prompt"] for run in ref["cases"]["generate"]["runs"] if "prompt" in run]
    ids, mask = _left_pad(prompts)
    P, seeds = ids.shape[1], torch.tensor([3, 4, 5, 6, 7])
    sampled = GenerationSettings(8, 8, 4, remasking="random", temperature=1.0)
    batched = generate(denoise, ids, mask, sampled, MASK_ID, seeds)[:, P:]
    assert (batched != MASK_ID).all()
    for row, prompt, seed in zip(batched, prompts, seeds):
        alone = generate(denoise, torch.tensor([prompt]), None, sampled, MASK_ID, seed[None])
        assert row.tolist() == alone[0, len(prompt):].tolist()
    assert torch.equal(generate(denoise, ids, mask, sampled, MASK_ID, seeds)[:, P:], batched)
    assert not torch.equal(generate(denoise, ids, mask, sampled, MASK_ID, seeds + 100)[:, P:], batched)
    greedy = generate(denoise, ids, mask, GenerationSettings(8, 8, 4), MASK_ID)[:, P:]
    for settings in (sampled, GenerationSettings(8, 8, 4, temperature=1.0), GenerationSettings(8, 8, 4, remasking="random")):
        assert not torch.equal(generate(denoise, ids, mask, settings, MASK_ID, seeds)[:, P:], greedy), settings


def test_gumbel_noise_samples_the_softmax():
    """The hashed uniforms make Gumbel-max draw from softmax(logits / temperature)."""
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0]).expand(4, 5000, 4)
    keys = noise_keys(torch.tensor([1, 2, 3, 4]), 0, 5, torch.arange(5000))
    for temperature in (1.0, 0.5):
        picked = add_gumbel_noise(logits, temperature, keys).argmax(-1).flatten()
        share = torch.bincount(picked, minlength=4) / picked.numel()
        assert torch.allclose(share, torch.softmax(logits[0, 0] / temperature, 0), atol=0.015), temperature


def test_sampling_needs_row_seeds():
    with pytest.raises(ValueError, match="row_seeds"):
        generate(lambda *a: None, torch.tensor([[1, 2]]), None, GenerationSettings(4, 4, 4, temperature=1.0), 9)


def test_a_mask_inside_the_prompt_is_decoded_as_upstream_does():
    """Upstream's generate takes every mask token of the canvas up to the current block's end as a
    candidate, a mask inside the prompt too. Constructed logits make the prompt's mask the most
    confident position: the first step commits it (one token per step), then the answer's by
    confidence. The schedule counts the block's tokens (4 over 4 steps) as upstream's
    get_num_transfer_tokens does, so the least confident answer position stays masked."""
    V, prompt = 8, [1, MASK_ID, 2]
    confidence = torch.tensor([0.0, 5.0, 0.0, 1.0, 2.0, 3.0, 4.0])  # per canvas column: the prompt's mask first

    def denoise(ids, attention_mask, logits_at):
        logits = torch.zeros(ids.shape[0], ids.shape[1], V)
        logits[..., 6] = confidence  # token 6 predicted everywhere, more or less confidently
        return logits[:, logits_at]

    seen = []
    settings = GenerationSettings(gen_length=4, steps=4, block_length=4)
    out = generate(lambda ids, mask, at: seen.append(ids.clone()) or denoise(ids, mask, at), torch.tensor([prompt]), None,
                   settings, MASK_ID)
    assert out[0].tolist() == [1, 6, 2, MASK_ID, 6, 6, 6]
    assert seen[1][0].tolist() == [1, 6, 2] + [MASK_ID] * 4  # the prompt's mask went first
