"""LLaDA2 (mixture of experts, block diffusion) and LLaDA-MoE against what their public code computes
on the tiny checkpoints of tests/fixtures/llada2-reference and llada-moe-reference: logits (block-
causal and full attention), hidden states, the experts each token is routed to and their weights,
skipped layers, LLaDA2.0's generate and LLaDA2.1's editing generate (token for token, the same
number of forwards), with and without the KV cache, alone and in padded batches; LLaDA-MoE's
decoding is LLaDA's (Fast-dLLM's generate)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lm_eval_dlmskip.decoding.block_diffusion import BlockDiffusionSettings, block_generate, choose
from lm_eval_dlmskip.decoding.generate import GenerationSettings, generate
from lm_eval_dlmskip.models.execution import KVCache
from lm_eval_dlmskip.models.loading import load_model
from lm_eval_dlmskip.models.moe import route
from lm_eval_dlmskip.skipping.policies import RandomSkip, StaticSkip

FIXTURES = Path(__file__).parent / "fixtures"
LLADA2, LLADA_MOE = FIXTURES / "llada2-reference", FIXTURES / "llada-moe-reference"
MASK, EOS = 250, 251
CPU = torch.device("cpu")


def fixture(path: Path) -> tuple[torch.nn.Module, dict, dict]:
    return (load_model(str(path), dtype="float32").model, json.loads((path / "reference.json").read_text()),
            load_file(str(path / "reference.safetensors")))


@pytest.fixture(scope="module")
def llada2():
    return fixture(LLADA2)


@pytest.fixture(scope="module")
def llada_moe():
    return fixture(LLADA_MOE)


class Counted:
    """A denoiser over a model that counts its forwards."""

    def __init__(self, model) -> None:
        self.model, self.calls = model, 0

    def __call__(self, ids, attention_mask, logits_at, cache=None, window=None, **options):
        self.calls += 1
        return self.model(ids, attention_mask, logits_at=logits_at, cache=cache, window=window, **options)[0]


def mlp_inputs(model, ids: torch.Tensor, **forward) -> dict[int, torch.Tensor]:
    """The tokens entering each MoE block's experts (after its attention half and ff_norm), [T, d]."""
    captured, hooks = {}, []

    def keep(layer: int):
        def hook(module, args, out) -> None:
            captured[layer] = out.flatten(0, 1)
        return hook

    for i, block in enumerate(model.blocks):
        if block.moe is not None:
            hooks.append(block.ff_norm.register_forward_hook(keep(i)))
    with torch.no_grad():
        model(ids, **forward)
    for hook in hooks:
        hook.remove()
    return captured


def assert_routes(model, tensors: dict, ids: torch.Tensor, **forward) -> None:
    """Per MoE layer: the same experts per token as upstream (as sets) with the same weights."""
    layers = mlp_inputs(model, ids, **forward)
    assert sorted(layers) == sorted(int(k.split(".")[1]) for k in tensors if k.endswith("topk_idx"))
    for layer, tokens in layers.items():
        moe = model.blocks[layer].moe
        chosen, weights = route(tokens, moe.gate, moe.expert_bias, moe.moe)
        expected = tensors[f"experts.{layer}.topk_idx"].flatten(0, 1)
        expected_weights = tensors[f"experts.{layer}.topk_weight"].flatten(0, 1).float()
        assert torch.equal(chosen.sort(1).values, expected.sort(1).values), layer
        ours = weights.gather(1, chosen.argsort(1))  # weights in expert order
        assert torch.allclose(ours, expected_weights.gather(1, expected.argsort(1)), atol=1e-5), layer


def test_llada2_logits_hidden_states_and_skips_are_upstreams(llada2):
    model, _, tensors = llada2
    ids = tensors["forward.input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(ids, block_length=4)[0], tensors["forward.logits"], atol=1e-4)
        assert torch.allclose(model(ids)[0], tensors["forward.full_attention_logits"], atol=1e-4)
        assert torch.allclose(model(ids, block_length=4, policy=StaticSkip({1, 3}))[0], tensors["skip.logits"], atol=1e-4)
        states = torch.stack(model.hidden_states(ids, block_length=4))
    assert torch.allclose(states, tensors["forward.hidden_states"], atol=1e-4)


def test_llada2_routes_tokens_to_upstreams_experts(llada2):
    model, _, tensors = llada2
    assert_routes(model, tensors, tensors["forward.input_ids"], block_length=4)


def test_llada_moe_logits_padding_skips_and_routes_are_upstreams(llada_moe):
    model, _, tensors = llada_moe
    ids, padded, mask = tensors["forward.input_ids"], tensors["padded.input_ids"], tensors["padded.attention_mask"]
    with torch.no_grad():
        assert torch.allclose(model(ids)[0], tensors["forward.logits"], atol=1e-4)
        assert torch.allclose(model(ids, policy=StaticSkip({1, 3}))[0], tensors["skip.logits"], atol=1e-4)
        assert torch.allclose(torch.stack(model.hidden_states(ids)), tensors["forward.hidden_states"], atol=1e-4)
        logits = model(padded, mask)[0]
    assert torch.allclose(logits * mask[..., None], tensors["padded.logits"], atol=1e-4)
    assert_routes(model, tensors, ids)


def test_llada_moe_decodes_as_llada(llada_moe):
    """LLaDA-MoE decodes with LLaDA's generate (Fast-dLLM's, also with its threshold)."""
    model, ref, _ = llada_moe
    for run in ref["generate"]["runs"]:
        s = run["settings"]
        settings = GenerationSettings(gen_length=s["gen_length"], steps=s["steps"], block_length=s["block_length"],
                                      threshold=s["threshold"])
        denoise = Counted(model)
        out = generate(denoise, torch.tensor([run["prompt"]]), None, settings, MASK)
        assert out[0].tolist() == run["output"], s
        assert denoise.calls == run["nfe"], s


def block_settings(run: dict, cache: str) -> BlockDiffusionSettings:
    s = run["settings"]
    given = {k: v for k, v in s.items() if v is not None}  # None: upstream's default
    if "editing_threshold" in s:
        given.setdefault("editing_threshold", 0.9)
    return BlockDiffusionSettings(**given, eos_early_stop=run["eos_early_stop"], cache=cache)


def answers_agree(ours: list[int], theirs: list[int]) -> bool:
    """Upstream returns the answer up to and with its first EOS; ours is EOS from there on."""
    return ours[: len(theirs)] == theirs and (len(theirs) == len(ours) or theirs[-1] == EOS)


@pytest.mark.parametrize("version", ["generate", "generate_llada21"])
@pytest.mark.parametrize("cache", ["blocks", "none"])
def test_llada2_generate_is_upstreams_token_for_token_with_its_forwards(llada2, version, cache):
    """Recorded runs of LLaDA2.0's generate and LLaDA2.1's editing generate, one prompt at a time:
    the same answer and the same number of forwards, with the exact cache over finished blocks and
    without it (every 4th run here; every run's tokens in the batched test below)."""
    model, ref, _ = llada2
    for run in ref[version]["runs"][:: 4 if cache == "blocks" else 9]:
        denoise = Counted(model)
        out = block_generate(denoise, [run["prompt"]], block_settings(run, cache), MASK, EOS, EOS, CPU)[0].tolist()
        assert answers_agree(out, run["output"]), run
        assert denoise.calls == run["nfe"], run


@pytest.mark.parametrize("version", ["generate", "generate_llada21"])
def test_llada2_padded_batches_decode_each_row_as_alone(llada2, version):
    """All recorded runs, the prompts of one setting in one batch: prompts of 3, 5, 8 and 11 tokens
    (their blocks aligned by whole-block left padding, one row with a block fewer than another)
    give upstream's batch-1 answers."""
    model, ref, _ = llada2
    runs = ref[version]["runs"]
    key = lambda r: json.dumps([r["settings"], r["eos_early_stop"]], sort_keys=True)  # noqa: E731
    for setting in dict.fromkeys(map(key, runs)):
        group = [r for r in runs if key(r) == setting]
        out = block_generate(Counted(model), [r["prompt"] for r in group], block_settings(group[0], "blocks"),
                             MASK, EOS, EOS, CPU)
        for row, run in zip(out.tolist(), group):
            assert answers_agree(row, run["output"]), run


def test_llada2_sampler_runs_equal_generate(llada2):
    """dllm's LLaDA2Sampler (batches of equal prompts, the whole canvas) decodes the same answers."""
    model, ref, _ = llada2
    for run in ref["sampler"]["runs"]:
        if run["eos_early_stop"]:
            continue  # its eos_early_stop leaves masks behind (a sampler quirk, not LLaDA2's generate)
        settings = block_settings({**run, "settings": {**run["settings"]}}, "blocks")
        out = block_generate(Counted(model), run["prompts"], settings, MASK, EOS, EOS, CPU)
        for prompt, canvas, ours in zip(run["prompts"], run["output"], out.tolist()):
            theirs = canvas[len(prompt) : len(prompt) + settings.gen_length]
            cut = theirs.index(EOS) + 1 if EOS in theirs else len(theirs)
            assert answers_agree(ours, theirs[:cut]), run


def test_llada2_rows_skipping_different_blocks_decode_as_alone(llada2, monkeypatch):
    """Random skipping draws other blocks per row and forward, so under the exact cache a row may
    run a block whose keys it skipped earlier: those slots are hidden from it. A padded batch
    decodes each row as that row alone, with the same per-row draws (keyed by the row's tokens).
    Slots start at 1e4 rather than conftest's NaN: a hidden slot weighs exactly 0 in attention,
    but 0 x NaN is NaN, while a slot read by mistake still moves the answer."""
    allocate = KVCache.allocate

    def poisoned(self, *args, **kwargs) -> None:
        allocate(self, *args, **kwargs)
        for storage in (*self.k, *self.v):
            storage.fill_(1e4)

    monkeypatch.setattr(KVCache, "allocate", poisoned)
    model, ref, _ = llada2
    runs = [r for r in ref["generate"]["runs"] if not r["eos_early_stop"]][:4]
    policy = RandomSkip(2, model.cfg.n_layers, seed=3)

    def denoise(ids, attention_mask, logits_at, cache=None, window=None, **options):
        return model(ids, attention_mask, policy=policy, logits_at=logits_at, cache=cache, window=window, **options)[0]

    settings = block_settings(runs[0], "blocks")
    together = block_generate(denoise, [r["prompt"] for r in runs], settings, MASK, EOS, EOS, CPU)
    for row, run in zip(together.tolist(), runs):
        alone = block_generate(denoise, [run["prompt"]], settings, MASK, EOS, EOS, CPU)[0].tolist()
        assert row == alone, run["prompt"]


def test_a_confidence_equal_to_the_threshold_does_not_exceed_it():
    """LLaDA2's rule commits the positions whose confidence exceeds the threshold (upstream's
    ``confidence > threshold``), else the step's quota of most confident ones: two masked positions
    at exactly 0.5 with threshold 0.5 and a quota of 1 commit one position, not both."""
    confidence = torch.tensor([[0.5, 0.25, 0.5]])
    masked = torch.ones(1, 3, dtype=torch.bool)
    assert int(choose(confidence, masked, 1, 0.5).sum()) == 1
    assert choose(confidence, masked, 1, 0.4).tolist() == [[True, False, True]]  # both exceed 0.4: both go


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, None, 3), (0.7, 0.8, None), (1.3, 0.87, None)])
def test_llada2_sampled_tokens_follow_the_closed_form(temperature, top_p, top_k):
    """LLaDA2's sampler (upstream's _sample_with_temperature_topk_topp) draws from softmax(logits /
    temperature) restricted to the top_k largest, or to the nucleus up to and including the token
    whose cumulative probability first exceeds top_p: 20000 draws against that distribution (one
    filter at a time: upstream renormalises after top_k before top_p, Dream's closed form does not)."""
    from lm_eval_dlmskip.decoding.block_diffusion import sample
    from lm_eval_dlmskip.decoding.noise import noise_keys

    from .test_dream_sampling import LOGITS_EVEN, assert_distribution, dream_distribution

    W = 20000
    settings = BlockDiffusionSettings(temperature=temperature, top_p=top_p, top_k=top_k)
    logits = torch.tensor([LOGITS_EVEN]).expand(1, W, -1)
    tokens, _ = sample(logits, settings, noise_keys(torch.tensor([7]), 0, 0, torch.arange(W)))
    assert_distribution(tokens, dream_distribution(LOGITS_EVEN, temperature, top_p, top_k), f"{temperature} {top_p} {top_k}")


def test_a_window_forward_charges_each_row_the_real_keys_before_the_windows_end(llada2):
    """FLOPs of a cached block-causal forward count, per row, the keys it attends to: the real
    (non-padding) columns before the window's end, never the masked canvas after it (hand count)."""
    model, _, _ = llada2
    block = 4
    ids = torch.full((2, 16), MASK)
    ids[0, :6] = torch.arange(6) + 10  # 6 real prompt tokens
    ids[1, 2:6] = torch.arange(4) + 10  # 2 padding columns, 4 real prompt tokens
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :2] = 0
    cache = KVCache()
    _, fill = model(ids, attention_mask, cache=cache, block_length=block)
    assert fill.keys.tolist() == [16, 14]  # the fill attends to every real column
    _, window = model(ids, attention_mask, logits_at=slice(0, 4), cache=cache, window=slice(4, 8), block_length=block)
    assert window.keys.tolist() == [8, 6]  # columns 0..7, less row 1's two padding columns
    assert window.seq_lens.tolist() == [4, 4]
