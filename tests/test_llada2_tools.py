"""Router training, calibration and analysis on the tiny LLaDA2 (tests/fixtures/llada2-reference):
each sees the block-causal attention LLaDA2 decodes with. Training's loss and validation against
the model's own block-causal forward computed here; a trained router evaluated through llada2_skip
and its checkpoint's identity (the nested MoE config) round-tripped; calibrate's similarity against
the hidden states of each prompt alone; analyze tracing LLaDA2's own block diffusion."""

from __future__ import annotations

import argparse
import itertools
import json
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from lm_eval_dlmskip.data import Pair
from lm_eval_dlmskip.decoding.block_diffusion import BlockDiffusionSettings, block_generate
from lm_eval_dlmskip.harness.llada import LLaDASkipLM
from lm_eval_dlmskip.harness.llada2 import LLaDA2SkipLM
from lm_eval_dlmskip.models.loading import load_model
from lm_eval_dlmskip.report import analyze, calibrate
from lm_eval_dlmskip.skipping.routers import RouterConfig, Routers
from lm_eval_dlmskip.train.config import TrainConfig
from lm_eval_dlmskip.train.loop import train
from lm_eval_dlmskip.train.objective import RouterObjective, collate, validate, validation_batches

from .conftest import REFERENCE, words
from .test_flops_reference import Ran

LLADA2 = Path(__file__).parent / "fixtures" / "llada2-reference"
LLADA_MOE = Path(__file__).parent / "fixtures" / "llada-moe-reference"
MASK, PAD = 250, 251


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return load_model(str(LLADA2), dtype="float32").model


def pairs(n: int, seed: int = 0) -> list[Pair]:
    """Prompts of 2-6 tokens and targets of 3-7: targets spanning one to three blocks of 4."""
    rng = random.Random(seed)
    return [Pair([rng.randrange(240) for _ in range(rng.randrange(2, 7))], [rng.randrange(240) for _ in range(rng.randrange(3, 8))])
            for _ in range(n)]


def always_execute(model) -> Routers:
    """Routers whose every vote is execute, whatever the Gumbel noise: the forward is the model's."""
    routers = Routers(RouterConfig(model.cfg.d_model, model.cfg.n_layers, hidden=8, init_bias=100.0))
    for router in routers.routers:
        torch.nn.init.zeros_(router.net[-1].weight)
    return routers


def masked_ce(model, ids, attention_mask, masked, block_length) -> torch.Tensor:
    """[b] summed cross-entropy of the masked positions, the model attending block-causally."""
    with torch.no_grad():
        logits = model(torch.where(masked, MASK, ids), attention_mask, block_length=block_length)[0]
    ce = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten(), reduction="none").view(ids.shape)
    return (ce * masked).sum(1)


def test_training_and_validation_attend_block_causally(model):
    """With every target token masked (min_mask_ratio 1) and the routers executing every block, the
    objective's CE is the block-causal model's summed CE over the target / target length; the
    validation CE is the block-causal CE over validation's masks. Full attention gives other values."""
    examples = pairs(6)
    batch = collate(examples, PAD)
    cfg = TrainConfig(model="m", output="o", data="d", min_mask_ratio=1.0)
    objective = RouterObjective(model, always_execute(model), cfg, MASK, block_length=4)
    _, stats = objective(batch, torch.Generator().manual_seed(0))
    by_hand = (masked_ce(model, batch.ids, batch.attention_mask, batch.target, 4) / batch.target_len).mean()
    full = (masked_ce(model, batch.ids, batch.attention_mask, batch.target, None) / batch.target_len).mean()
    assert float(stats["ce"]) == pytest.approx(float(by_hand), abs=1e-5)
    assert abs(float(full - by_hand)) > 0.1
    assert float(stats["alpha"]) == 0.0

    val = validate(model, always_execute(model), examples, 4, 0, MASK, PAD, block_length=4)
    sums = [(masked_ce(model, b.ids, b.attention_mask, m, 4).sum(), m.sum()) for b, m in validation_batches(examples, 4, 0, PAD)]
    assert val["val_ce"] == pytest.approx(float(sum(s for s, _ in sums) / sum(n for _, n in sums)), abs=1e-5)
    assert val["val_execution_ratio"] == 1.0


def test_train_then_evaluate_routed_and_the_router_identity(tmp_path):
    """dlmskip train on the MoE model (a few steps, block-causal in blocks of 4), the router evaluated
    through llada2_skip (blocks run counted by hooks); its checkpoint records the model's whole
    config, the nested MoE config included, and is refused for a model whose MoE config differs
    (unless allow_mismatch) or for another family."""
    from lm_eval_dlmskip.cli import main

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": words(p.prompt), "target": " " + words(p.target)}) + "\n"
                            for p in pairs(24, seed=1)))
    router = tmp_path / "router"
    assert main(["train", "--model", str(LLADA2), "--data", str(data), "--output", str(router), "--router-hidden", "8",
                 "--batch-size", "4", "--effective-batch-size", "8", "--warmup-steps", "1", "--lr", "1e-2", "--lambda", "1",
                 "--dtype", "float32", "--device", "cpu", "--max-steps", "3", "--eval-every", "3", "--block-length", "4"]) == 0
    meta = json.loads((router / "router.json").read_text())
    cfg = load_model(str(LLADA2), dtype="float32").model.cfg
    assert meta["training"]["block_length"] == 4 and meta["base_model"]["family"] == "llada2"
    assert meta["base_model"]["config"]["moe"] == json.loads(json.dumps(asdict(cfg.moe)))
    assert meta["base_model"]["config"]["moe"]["moe_layers"] == [False, True, True, True]

    lm = LLaDA2SkipLM(pretrained=str(LLADA2), device="cpu", dtype="float32", router=str(router), block_length=4, mc_num=4,
                      mc_batch=2, batch_size=2)
    ran = Ran(lm.model, lm.model.wte, lm.model.blocks)
    gen = {"until": [], "max_gen_toks": 8, "steps": 4, "block_length": 4}
    lm.generate_until([Instance("generate_until", {}, (p, gen), 0, ("gen", i, 1)) for i, p in enumerate(("t5 t6", "t7 t8"))],
                      disable_tqdm=True)
    lm.loglikelihood([Instance("loglikelihood", {}, ("t5 t6 t7", " t9 t10"), 0, ("ll", 0, 1))], disable_tqdm=True)
    info = lm.get_model_info()["dlmskip"]
    assert info["skip"]["method"] == "routed" and info["skip"]["finished"] is True
    flops = info["flops"]
    executed = [sum(flops[t]["block_execution_ratio"][b] * flops[t]["forwards"] for t in flops) for b in range(4)]
    assert executed == pytest.approx(ran.block_rows, abs=1e-9) and sum(flops[t]["forwards"] for t in flops) == ran.rows

    other = tmp_path / "top2"
    shutil.copytree(LLADA2, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": 2}))  # same weights, other routing
    with pytest.raises(ValueError, match=r"differs in moe \(.*'top_k': 4.* there, .*'top_k': 2.* here\)"):
        LLaDA2SkipLM(pretrained=str(other), device="cpu", router=str(router))
    assert LLaDA2SkipLM(pretrained=str(other), device="cpu", router=str(router), allow_mismatch=True).policy is not None
    with pytest.raises(ValueError, match="made for LLaDA2, while this model is LLaDA"):
        LLaDASkipLM(pretrained=str(LLADA_MOE), device="cpu", router=str(router), allow_mismatch=True)

    # without --block-length, training attends in decoding's default blocks of 32
    assert main(["train", "--model", str(LLADA2), "--data", str(data), "--output", str(tmp_path / "default"),
                 "--router-hidden", "8", "--batch-size", "4", "--effective-batch-size", "4", "--warmup-steps", "1",
                 "--dtype", "float32", "--device", "cpu", "--max-steps", "1"]) == 0
    assert json.loads((tmp_path / "default" / "router.json").read_text())["training"]["block_length"] == 32


def test_a_block_length_is_refused_for_models_that_attend_to_every_position(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "t1 t2", "target": " t3"}) + "\n")
    with pytest.raises(ValueError, match="--block-length=4: LLaDA attends to every position"):
        train(TrainConfig(model=str(REFERENCE), output=str(tmp_path / "r"), data=str(data), block_length=4, device="cpu",
                          dtype="float32"))
    args = calibrate_args(tmp_path, REFERENCE, ["--block-length", "4"])
    with pytest.raises(ValueError, match="--block-length=4: LLaDA attends to every position"):
        calibrate.calibrate(args)


def calibrate_args(tmp_path: Path, checkpoint: Path, extra: list[str]) -> argparse.Namespace:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("t5 t6 t7\nt40 t41\nt100 t7 t9 t12 t13\nt9 t3 t7 t1 t2 t4\n")
    parser = argparse.ArgumentParser()
    calibrate.add_arguments(parser)
    return parser.parse_args(["--model", str(checkpoint), "--data", str(prompts), "--output", str(tmp_path / "profile.json"),
                              "--threshold", "-1", "--max-skip", "1", "--answer-length", "6", "--dtype", "float32",
                              "--overwrite", *extra])


PROMPTS = [[5, 6, 7], [40, 41], [100, 7, 9, 12, 13], [9, 3, 7, 1, 2, 4]]


@torch.no_grad()
def similarity_alone(model, ids: list[int], where: slice, block_length: int) -> torch.Tensor:
    """[n_layers] mean over the columns ``where`` of cos(H_l, H_l+1), the row alone, block-causal."""
    states = model.hidden_states(torch.tensor([ids]), block_length=block_length)
    return torch.stack([F.cosine_similarity(a[0, where], b[0, where], dim=-1).mean() for a, b in itertools.pairwise(states)])


@pytest.mark.parametrize("block_length", [4, None])
def test_calibrate_measures_the_block_causal_hidden_states_of_each_prompt(tmp_path, model, block_length):
    """The profile's similarity: per prompt alone (prompt + 6 masks, blocks of 4, or 32 by default),
    the mean over its prompt positions of cos(input, output) of each block, averaged over prompts;
    the prompts of different lengths share a padded batch in calibrate."""
    extra = [] if block_length is None else ["--block-length", str(block_length)]
    profile = calibrate.calibrate(calibrate_args(tmp_path, LLADA2, extra))
    bl = block_length or 32
    assert profile["data"]["block_length"] == bl and profile["base_model"]["family"] == "llada2"
    by_hand = torch.stack([similarity_alone(model, p + [MASK] * 6, slice(0, len(p)), bl) for p in PROMPTS]).mean(0)
    assert profile["similarity"]["mean"] == pytest.approx(by_hand.tolist(), abs=1e-5)
    if block_length is not None:  # (a row of at most 12 columns is one block of 32: as full attention)
        full = torch.stack([similarity_alone(model, p + [MASK] * 6, slice(0, len(p)), 10**6) for p in PROMPTS]).mean(0)
        assert (full - by_hand).abs().max() > 1e-3  # full attention would measure something else


class Counted:
    """A denoiser over the model that counts its forwards."""

    def __init__(self, model) -> None:
        self.model, self.calls = model, 0

    def __call__(self, ids, attention_mask, logits_at, **options):
        self.calls += 1
        return self.model(ids, attention_mask, logits_at=logits_at, **options)[0]


def test_analyze_traces_llada2s_block_diffusion(tmp_path, model):
    """analyze decodes with block_generate (blocks of 4, uncached, LLaDA2's threshold): one traced
    step per forward it makes, the first step's similarity that of each prompt's first decoding
    block alone (prompt and masks to its block's end, block-causal, over every column), and the
    calibration in analysis.json measured block-causally as calibrate measures it."""
    args = calibrate_args(tmp_path, LLADA2, [])
    parser = argparse.ArgumentParser()
    analyze.add_arguments(parser)
    args = parser.parse_args(["--model", str(LLADA2), "--data", args.data, "--out", str(tmp_path / "an"), "--gen-length", "8",
                              "--block-length", "4", "--steps", "4", "--decode-limit", "3", "--threshold", "-1",
                              "--max-skip", "1", "--answer-length", "6", "--dtype", "float32"])
    assert analyze.run_analyze(args) == 0
    traced = json.loads((tmp_path / "an" / "analysis.json").read_text())
    counted = Counted(model)
    settings = BlockDiffusionSettings(gen_length=8, block_length=4, steps=4, cache="none")
    block_generate(counted, PROMPTS[:3], settings, MASK, PAD, PAD, torch.device("cpu"))
    assert len(traced["similarity"]) == counted.calls and len(traced["similarity"][0]) == 3
    for row, prompt in enumerate(PROMPTS[:3]):
        end = (len(prompt) // 4 + 1) * 4
        first = similarity_alone(model, prompt + [MASK] * (end - len(prompt)), slice(None), 4)
        assert traced["similarity"][0][row] == pytest.approx(first.tolist(), abs=1e-5)
    assert traced["generation"]["block_length"] == 4 and traced["calibration"]["data"]["block_length"] == 4
    profile = calibrate.calibrate(calibrate_args(tmp_path, LLADA2, ["--block-length", "4"]))
    assert traced["calibration"]["similarity"] == profile["similarity"]
