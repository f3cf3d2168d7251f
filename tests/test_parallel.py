"""``parallelize=True`` (issue 21 item 4): a model split over devices, whole blocks per device,
decodes, scores and counts FLOPs as the same model on one device.

On the CPU the blocks alternate between ``cpu`` and ``cpu:0``: torch counts them as different
devices, so every block boundary takes the split path (hidden states and the forward's context
moved, each block's KV cache storage its own, the head after the last block, logits brought back),
though the memory is the same; the results must then be bitwise those of the unsplit model. With a
GPU the first blocks run on it and the rest on the CPU (real copies between devices; float32
results within rounding, tokens identical). Every cache fill starts from NaN (conftest), so a
block that reads another device's or a stale storage poisons the answer."""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance

import lm_eval_dlmskip.models.loading as loading
from lm_eval_dlmskip.decoding.block_diffusion import BlockDiffusionSettings, block_generate
from lm_eval_dlmskip.decoding.generate import GenerationSettings
from lm_eval_dlmskip.harness.llada import LLaDASkipLM
from lm_eval_dlmskip.harness.model_args import Parallel
from lm_eval_dlmskip.harness.requests import split_over_devices
from lm_eval_dlmskip.models.execution import KVCache
from lm_eval_dlmskip.models.loading import load_model, tokenizer_fingerprint
from lm_eval_dlmskip.models.placement import Placement, plan_placement
from lm_eval_dlmskip.skipping.identity import model_identity
from lm_eval_dlmskip.skipping.policies import NO_SKIP, RandomSkip, StaticSkip
from lm_eval_dlmskip.skipping.routers import RoutedSkip

from .conftest import REFERENCE, words
from .rows import ProgressSkip, decode, random_prompts, tiny_routers
from .test_llada2 import LLADA2
from .test_settings import _router

CPU, CPU0 = torch.device("cpu"), torch.device("cpu", 0)
CUDA = torch.cuda.is_available()


def alternating(n_layers: int) -> Placement:
    """Every block on another device than the one before it (cpu / cpu:0), the head on the last."""
    blocks = tuple(CPU if i % 2 == 0 else CPU0 for i in range(n_layers))
    return Placement(CPU, blocks, blocks[-1])


def gpu_then_cpu(n_layers: int) -> Placement:
    """The embedding and the first half of the blocks on the GPU, the rest and the head on the CPU."""
    gpu = torch.device("cuda", 0)
    return Placement(gpu, tuple(gpu if i < n_layers // 2 else CPU for i in range(n_layers)), CPU)


SPLITS = [alternating] + ([gpu_then_cpu] if CUDA else [])


def split_and_whole(path, split) -> tuple[torch.nn.Module, torch.nn.Module]:
    whole = load_model(str(path), dtype="float32").model
    n_layers = whole.cfg.n_layers
    placement = split(n_layers)
    many = load_model(str(path), dtype="float32", placement=placement).model
    assert many.block_devices == placement.blocks
    assert [next(b.parameters()).device for b in many.blocks] == [torch.device(d.type) for d in placement.blocks] \
        or placement.embed.type == "cuda"
    return whole.to(placement.embed), many


def policies(device) -> dict:
    return {"none": NO_SKIP, "static": StaticSkip({1, 4}), "random": RandomSkip(2, 6, seed=3), "rows": ProgressSkip(),
            "routed": RoutedSkip(tiny_routers(5, device), 0.1)}


def place_routers(policy, model) -> None:
    if isinstance(policy, RoutedSkip):
        for router, device in zip(policy.routers.routers, model.block_devices):
            router.to(device)


@pytest.mark.parametrize("split", SPLITS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("cache, threshold", [("none", None), ("prefix", None), ("dual", None), ("dual", 0.5)])
def test_a_split_model_decodes_as_the_whole_one(split, cache, threshold):
    whole, many = split_and_whole(REFERENCE, split)
    device = whole.device
    settings = GenerationSettings(16, 16, 8, cache=cache, threshold=threshold)
    prompts = random_prompts(4, seed=11)
    exact = split is alternating
    for name, policy in policies(device).items():
        expected, one = decode(whole, policy, prompts, settings, device)
        place_routers(policy, many)
        got, log = decode(many, policy, prompts, settings, device)
        assert torch.equal(got, expected), name
        assert len(log.forwards) == len(one.forwards), name
        for f, g in zip(log.forwards, one.forwards):
            assert f.logits.device == g.logits.device and torch.equal(f.executed, g.executed), name
            assert torch.equal(f.logits, g.logits) if exact else torch.allclose(f.logits, g.logits, atol=1e-4), name


@pytest.mark.parametrize("split", SPLITS, ids=lambda f: f.__name__)
def test_the_cache_of_a_split_model_lives_with_each_block(split):
    _, many = split_and_whole(REFERENCE, split)
    cache = KVCache()
    ids = torch.tensor([[5, 6, 7, 250, 250]], device=many.device)
    with torch.no_grad():
        many(ids, cache=cache)
    assert isinstance(cache.k, list) and cache.length == 5
    assert [k.device.type for k in cache.k] == [d.type for d in many.block_devices]
    assert all(k.isfinite().all() for k in cache.k)  # every block wrote its own storage over the NaN fill


@pytest.mark.parametrize("split", SPLITS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("cache", ["none", "blocks"])
def test_a_split_llada2_decodes_block_by_block_as_the_whole_one(split, cache):
    """LLaDA2's block-causal attention and exact cache (every forward writes its window, a row that
    skipped a block hides those keys) with per-row skipping, split and not."""
    whole, many = split_and_whole(LLADA2, split)
    cfg = whole.cfg
    settings = BlockDiffusionSettings(gen_length=8, block_length=4, steps=4, threshold=0.95, cache=cache)
    prompts = [[5, 6, 7], [40, 41, 42, 43, 44, 45], [9]]
    for policy in (NO_SKIP, ProgressSkip(), RandomSkip(1, cfg.n_layers, seed=2)):
        def run(model):
            def denoise(ids, attention_mask, logits_at, cache=None, window=None, block_length=None):
                return model(ids, attention_mask, policy=policy, logits_at=logits_at, cache=cache, window=window,
                             block_length=block_length)[0]
            return block_generate(denoise, prompts, settings, cfg.mask_token_id, cfg.eos_token_id, cfg.eos_token_id,
                                  whole.device)
        assert torch.equal(run(many), run(whole)), policy


def _requests(ref) -> tuple[list[Instance], list[Instance]]:
    runs = ref["cases"]["loglikelihood"]["runs"][:3]
    ll = [Instance("loglikelihood", {}, (words(r["prompt"]), " " + words(r["answer"])), i, ("t", i, 1))
          for i, r in enumerate(runs)]
    gen = [Instance("generate_until", {}, (words(r["prompt"]), {"until": ["t247"]}), i, ("g", i, 1))
           for i, r in enumerate(runs)]
    return ll, gen


def test_parallelize_through_the_harness_equals_one_device(monkeypatch, ref):
    """``llada_skip`` with parallelize=True (placement forced to alternate, as accelerate cannot
    place blocks on two devices of a CPU-only machine): the same likelihoods, answers and FLOPs as
    without; routers beside their blocks; no CUDA graphs; the placement in the results."""
    args = {"pretrained": str(REFERENCE), "dtype": "float32", "mc_num": 4, "gen_length": 8, "steps": 8,
            "block_length": 8, "cache": "dual", "skip_random": 2}
    plain = LLaDASkipLM(device="cpu", **args)
    monkeypatch.setattr(loading, "plan_placement", lambda cfg, *_: alternating(cfg.n_layers))
    split = LLaDASkipLM(parallelize=True, max_cpu_memory="1GB", **args)
    assert split.model.block_devices == alternating(6).blocks and split.generation_forward is split.model
    ll, gen = _requests(ref)
    assert split.loglikelihood(ll) == plain.loglikelihood(ll)
    assert split.generate_until(gen) == plain.generate_until(gen)
    info, base = split.get_model_info()["dlmskip"], plain.get_model_info()["dlmskip"]
    assert info["flops"] == base["flops"]
    assert info["parallelize"] == {"device_map": "auto", "max_memory_per_gpu": None, "max_cpu_memory": "1GB"}
    assert info["speed"]["device"] == "cpu (cpu): 3 blocks, cpu:0 (cpu): 3 blocks"


# ---- refused before any weight is read ---------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    ({"max_memory_per_gpu": "1GB"}, r"max_memory_per_gpu='1GB' only applies with parallelize=True"),
    ({"max_cpu_memory": "1GB"}, r"max_cpu_memory='1GB' only applies with parallelize=True"),
    ({"parallelize": True, "device_map": "everywhere"}, r"device_map='everywhere': use one of auto, balanced"),
    ({"parallelize": True, "max_memory_per_gpu": "lots"}, r"max_memory_per_gpu='lots' is not an amount of memory"),
])
def test_parallelize_settings_are_judged_before_loading(monkeypatch, args, message):
    monkeypatch.setattr("lm_eval_dlmskip.harness.base.load_model", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ValueError, match=message):
        LLaDASkipLM(pretrained=str(REFERENCE), **args)


@pytest.mark.skipif(CUDA, reason="the CPU-only case")
def test_parallelize_without_a_gpu_or_cpu_budget_names_the_fix(monkeypatch):
    monkeypatch.setattr(loading, "read_state_dict", lambda *a, **k: pytest.fail("weights read"))
    with pytest.raises(ValueError, match="parallelize=True found no GPU to place blocks on; give max_cpu_memory"):
        LLaDASkipLM(pretrained=str(REFERENCE), parallelize=True)


def test_parallelize_under_data_parallel_processes_is_refused():
    with pytest.raises(ValueError, match=r"parallelize=True splits one model over the host's GPUs, but 2 data-parallel"):
        split_over_devices(Parallel(), processes=2)
    assert split_over_devices(None, processes=2) == {}


def test_a_model_that_does_not_fit_is_refused_not_put_on_disk(monkeypatch):
    monkeypatch.setattr(loading, "read_state_dict", lambda *a, **k: pytest.fail("weights read"))
    with pytest.raises(ValueError, match=r"the model does not fit in max_memory=.*raise max_memory_per_gpu"):
        load_model(str(REFERENCE), dtype="float32", max_memory={"cpu": 10_000}, device_map="sequential")


def test_a_tied_head_stays_with_the_embedding():
    cfg = load_model(str(REFERENCE), dtype="float32").model.cfg
    from dataclasses import replace

    plan = plan_placement(replace(cfg, weight_tying=True), torch.float32, {"cpu": 10**9})
    assert plan.head == plan.embed == CPU and set(plan.blocks) == {CPU}
    assert plan.device_of("wte.weight") == CPU and plan.device_of("blocks.3.q_proj.weight") == plan.blocks[3]


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("skip", ["random", "routed"])
def test_parallelize_spreads_blocks_over_the_gpu_and_the_cpu_and_answers_alike(ref, tmp_path, skip):
    """accelerate's own plan (no forcing): GPU memory for about half the blocks, the rest on the CPU;
    routers beside their blocks."""
    args = {"pretrained": str(REFERENCE), "dtype": "float32", "mc_num": 4, "gen_length": 8, "steps": 8,
            "block_length": 8, "cache": "dual", "threshold": 0.5, "compile": False}
    if skip == "routed":
        plain = LLaDASkipLM(device="cuda", cuda_graphs=False, **args)
        identity = model_identity(plain.cfg, str(REFERENCE), plain.checkpoint.fingerprint,
                                  tokenizer_fingerprint(plain.tokenizer))
        args["router"] = str(_router(tmp_path / "router", identity, plain.cfg, 1))
    else:
        args["skip_random"] = 2
    whole = LLaDASkipLM(device="cuda", cuda_graphs=False, **args)
    block_bytes = sum(p.numel() * 4 for p in whole.model.blocks[0].parameters())
    head_bytes = sum(p.numel() * 4 for n, p in whole.model.named_parameters() if not n.startswith("blocks."))
    split = LLaDASkipLM(parallelize=True, device_map="sequential", max_memory_per_gpu=head_bytes + 3 * block_bytes,
                        max_cpu_memory="4GB", **args)
    devices = split.model.block_devices
    assert {d.type for d in devices} == {"cuda", "cpu"}, devices
    if skip == "routed":
        assert [next(r.parameters()).device.type for r in split.policy.routers.routers] == [d.type for d in devices]
    ll, gen = _requests(ref)
    got, expected = split.loglikelihood(ll), whole.loglikelihood(ll)
    assert [g[1] for g in got] == [e[1] for e in expected]
    assert [g[0] for g in got] == pytest.approx([e[0] for e in expected], rel=1e-5)
    assert split.generate_until(gen) == whole.generate_until(gen)
    assert split.get_model_info()["dlmskip"]["flops"] == whole.get_model_info()["dlmskip"]["flops"]
