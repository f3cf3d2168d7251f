"""Dream against its own code (tests/fixtures/dream-reference): logits, diffusion_generate, the
Monte-Carlo estimator's exact cases; loading and the family checks."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lm_eval_dlmskip.decoding.dream import DreamGenerationSettings, dream_generate, transfer_counts
from lm_eval_dlmskip.decoding.likelihood import LikelihoodSettings, dream_masks, mc_loglikelihood
from lm_eval_dlmskip.models.loading import load_llada, load_model
from lm_eval_dlmskip.skipping.identity import check_identity, model_identity

from .conftest import model_denoiser

DREAM = Path(__file__).parent / "fixtures" / "dream-reference"
MASK, EOS = 126, 127


@pytest.fixture(scope="module")
def dream():
    return load_model(str(DREAM), dtype="float32").model


@pytest.fixture(scope="module")
def dream_ref() -> dict:
    return json.loads((DREAM / "reference.json").read_text())


def test_dream_config_and_names_map_onto_the_model(dream):
    cfg = dream.cfg
    assert (cfg.family, cfg.shift_logits, cfg.positions_from_mask, cfg.include_qkv_bias) == ("dream", True, True, True)
    assert (cfg.n_kv_heads, cfg.rope_theta, cfg.rms_norm_eps, cfg.rope_full_precision) == (2, 1e6, 1e-6, False)
    assert all(block.fused_weights() is not None for block in dream.blocks)  # one q/k/v matmul, bias included
    assert "qkv_bias" in dream.blocks[0].fused_weights()


def test_logits_match_dream_in_float32(dream):
    ref = load_file(str(DREAM / "reference.safetensors"))
    logits, _ = dream(ref["forward.input_ids"])
    assert (logits - ref["forward.logits"]).abs().max() < 1e-4
    padded, _ = dream(ref["padded.input_ids"], ref["padded.attention_mask"])
    valid = ref["padded.valid"]
    assert (padded[valid] - ref["padded.logits"][valid]).abs().max() < 1e-4
    # the head at chosen positions (slice and flat indices) gives the same shifted logits
    at_slice, _ = dream(ref["forward.input_ids"], logits_at=slice(0, 5))
    assert torch.allclose(at_slice, logits[:, 0:5], atol=1e-6)
    flat = torch.tensor([0, 3, 14, 20])
    at_flat, _ = dream(ref["forward.input_ids"], logits_at=flat)
    assert torch.allclose(at_flat, logits.flatten(0, 1)[flat], atol=1e-6)


def test_unfused_path_equals_fused(dream):
    ref = load_file(str(DREAM / "reference.safetensors"))
    fast, _ = dream(ref["forward.input_ids"])
    plain = load_model(str(DREAM), dtype="float32").model
    for block in plain.blocks:
        block._fused = {}
    slow, _ = plain(ref["forward.input_ids"])
    assert (fast - slow).abs().max() < 1e-5


def _left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    P = max(map(len, prompts))
    ids = torch.tensor([[EOS] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    return ids, None if bool(mask.all()) else mask


def test_generation_is_token_identical_to_diffusion_generate(dream, dream_ref):
    runs = dream_ref["generate"]
    assert len(runs) >= 80 and {r["alg"] for r in runs} == {"origin", "maskgit_plus", "topk_margin", "entropy"}
    for run in runs:
        settings = DreamGenerationSettings(
            gen_length=run["gen_length"], steps=run["steps"], alg=run["alg"], top_p=run.get("top_p"), top_k=run.get("top_k")
        )
        ids, mask = _left_padded(run["prompts"])
        out = dream_generate(model_denoiser(dream), ids, mask, settings, MASK)
        assert out.tolist() == run["output"], run


def test_generation_batch_equals_alone(dream, dream_ref):
    batched = [r for r in dream_ref["generate"] if len(r["prompts"]) > 1]
    assert batched
    for run in batched:
        settings = DreamGenerationSettings(gen_length=run["gen_length"], steps=run["steps"], alg=run["alg"])
        ids, mask = _left_padded(run["prompts"])
        together = dream_generate(model_denoiser(dream), ids, mask, settings, MASK)[:, ids.shape[1]:]
        for row, prompt in enumerate(run["prompts"]):
            alone = dream_generate(model_denoiser(dream), torch.tensor([prompt]), None, settings, MASK)[:, len(prompt):]
            assert together[row].tolist() == alone[0].tolist()


def test_sampled_generation_is_batch_invariant(dream):
    settings = DreamGenerationSettings(gen_length=8, steps=4, alg="origin", temperature=1.0, alg_temp=0.5)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    ids, mask = _left_padded(prompts)
    seeds = torch.tensor([11, 22])
    together = dream_generate(model_denoiser(dream), ids, mask, settings, MASK, seeds)[:, ids.shape[1]:]
    for row, prompt in enumerate(prompts):
        alone = dream_generate(model_denoiser(dream), torch.tensor([prompt]), None, settings, MASK, seeds[row:row + 1])
        assert together[row].tolist() == alone[0, len(prompt):].tolist()
    with pytest.raises(ValueError, match="row_seeds"):
        dream_generate(model_denoiser(dream), ids, mask, settings, MASK)


def test_transfer_schedule_commits_every_token():
    for steps, G in ((8, 8), (5, 12), (3, 10), (256, 256), (7, 100)):
        counts = transfer_counts(G, steps, 1e-3)
        assert sum(counts) == G and len(counts) == steps and min(counts) >= 0


def test_estimator_exact_cases(dream, dream_ref):
    """Their masks and masking probabilities replayed: each sample's score and the mean match."""
    lik = dream_ref["likelihood"]
    settings = LikelihoodSettings(mc_num=lik["mc_num"], mc_batch=lik["mc_batch"], estimator="dream",
                                  sampling_eps=lik["sampling_eps"])
    for case in lik["cases"]:
        masks = torch.tensor(case["masks"], dtype=torch.bool)
        p_mask = torch.tensor(case["p_mask"])
        for i in range(len(masks)):  # one sample at a time: its score is -per_sample
            one = replace(settings, mc_num=1, mc_batch=1)
            got = mc_loglikelihood(model_denoiser(dream), [case["prompt"]], [case["answer"]], one, MASK, EOS, [None],
                                   torch.device("cpu"), masks=[(masks[i:i + 1], 1 / p_mask[i:i + 1])])
            assert got[0] == pytest.approx(-case["per_sample"][i], rel=1e-5, abs=1e-5)
        got = mc_loglikelihood(model_denoiser(dream), [case["prompt"]], [case["answer"]], settings, MASK, EOS, [None],
                               torch.device("cpu"), masks=[(masks, 1 / p_mask)])
        assert got[0] == pytest.approx(-case["nll"], rel=1e-5)


def test_dream_masks_follow_the_forward_process():
    settings = LikelihoodSettings(mc_num=64, mc_batch=8, estimator="dream")
    pattern, p_mask = dream_masks(40, settings, torch.Generator().manual_seed(3))
    assert pattern.shape == (64, 40) and not pattern[:, -1].any()  # the appended EOS is never masked
    t = (p_mask - 1e-3) / (1 - 1e-3)
    spacing = (t.view(8, 8) - t.view(8, 8)[:, :1]) % 1  # one u per group, t_i = u + i/b mod 1
    assert torch.allclose(spacing, torch.arange(8) / 8, atol=1e-5)
    rate = pattern[:, :-1].float().mean(1)
    assert (rate - p_mask).abs().mean() < 0.1  # each token masked with its sample's probability
    with pytest.raises(ValueError, match="no classifier-free guidance"):
        LikelihoodSettings(estimator="dream", cfg=1.0).check()


def test_family_mismatch_is_refused_before_the_weights(tmp_path, ref_dir):
    broken = tmp_path / "dream"
    shutil.copytree(DREAM, broken)
    (broken / "model.safetensors").write_bytes(b"not read")  # loading must stop before it
    with pytest.raises(ValueError, match=r"expected LLaDA, found Dream \(model_type=Dream\): use --model dream_skip"):
        load_llada(str(broken))
    with pytest.raises(ValueError, match=r"expected Dream, found LLaDA \(model_type=llada\): use --model llada_skip"):
        load_model(str(ref_dir), family="dream")


def test_artifacts_of_another_family_are_refused(dream, ref_model):
    made_on_llada = model_identity(ref_model.cfg, "llada-tiny", "abc")
    with pytest.raises(ValueError, match="made for LLaDA, while this model is Dream"):
        check_identity(made_on_llada, dream.cfg, "abc", True, "router='r' was trained for")
    made_on_dream = model_identity(dream.cfg, "dream-tiny", "abc")
    with pytest.raises(ValueError, match="made for Dream, while this model is LLaDA"):
        check_identity(made_on_dream, ref_model.cfg, "abc", True, "skip_profile='p' was measured on")
    other_size = model_identity(replace(dream.cfg, n_layers=8), "dream-big", "abc")
    with pytest.raises(ValueError, match="n_layers=4"):
        check_identity(other_size, dream.cfg, "abc", True, "router='r' was trained for")


def test_window_forward_is_refused_for_dream(dream):
    with pytest.raises(ValueError, match="cached decoding .* not supported for Dream"):
        dream(torch.tensor([[1, 2, 3]]), window=slice(1, 2))


def _byte_level_bpe(folder: Path, config: dict) -> Path:
    """A Qwen2-style tokenizer as Dream's hub folder ships it: vocab.json, merges.txt, and a
    tokenizer_config.json naming DreamTokenizer as custom code with its special tokens."""
    folder.mkdir()
    vocab = {t: i for i, t in enumerate(["t", "1", "2", "Ġ", "Ġt"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nĠ t\n")
    special = {"content": "", "special": True, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
    tokens = {"5": "<|beginoftext|>", "6": "<|mask|>", "7": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        **config, "added_tokens_decoder": {i: {**special, "content": t} for i, t in tokens.items()},
        "bos_token": "<|beginoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "mask_token": "<|mask|>",
    }))
    return folder


def test_dreams_custom_tokenizer_loads_without_its_code(tmp_path):
    """Dream's hub tokenizer is DreamTokenizer, custom code (auto_map): it loads as the Qwen2 BPE it is,
    and an unknown custom tokenizer without tokenizer.json is refused with the fix named."""
    from lm_eval_dlmskip.models.loading import load_tokenizer

    auto_map = {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]}
    folder = _byte_level_bpe(tmp_path / "dream", {"tokenizer_class": "DreamTokenizer", "auto_map": auto_map})
    tokenizer = load_tokenizer(folder, mask_id=6)
    assert (tokenizer.mask_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (6, 7, 7)
    assert tokenizer.encode("t1 t2<|mask|>", add_special_tokens=False) == [0, 1, 4, 2, 6]
    other = _byte_level_bpe(tmp_path / "other", {"tokenizer_class": "OtherTokenizer", "auto_map": auto_map})
    with pytest.raises(ValueError, match="custom code .*add the tokenizer's tokenizer.json, or give tokenizer=PATH"):
        load_tokenizer(other, mask_id=6)
