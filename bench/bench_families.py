"""Dream-7B next to LLaDA-8B on one GPU (issue 11): the same skipping, each family's own decoding.

checks  (the tiny Dream fixture in float32 on the GPU) Dream decoding replayed from CUDA graphs equals
        eager decoding token for token over left-padded batches with mixed padding, for every
        unmasking algorithm and skip policy, at batch 1 and 16; batch 16 equals batch 1 row by row
        (Dream positions a padded row by its attention mask, so this checks per-row rotary tables
        in the replayed path too); sampled decoding (temperature 1) gives each row its text alone.
speed   (random bf16 weights, LLaDA-8B and Dream-7B shapes) one forward of 1024 tokens at batch 1
        and 8, and whole decoding calls (prompt 512, answer 256, 64 steps; LLaDA's ``generate``,
        Dream's ``dream_generate`` with ``alg=entropy``), each with static skipping of k blocks:
        milliseconds, tokens per second, and time against FLOPs relative to no skipping.

    PYTHONPATH=. python bench/bench_families.py --out families.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_llada import LLADA_8B, STATIC_SETS, peak_gib, random_model, reset_peak, timed  # noqa: E402

from lm_eval_dlmskip.decoding.dream import DreamGenerationSettings, dream_generate  # noqa: E402
from lm_eval_dlmskip.decoding.generate import GenerationSettings, generate  # noqa: E402
from lm_eval_dlmskip.decoding.graphs import GraphRunner  # noqa: E402
from lm_eval_dlmskip.models.config import LLaDAConfig  # noqa: E402
from lm_eval_dlmskip.models.loading import load_model  # noqa: E402
from lm_eval_dlmskip.skipping.flops import FlopsModel  # noqa: E402
from lm_eval_dlmskip.skipping.policies import NO_SKIP, RandomSkip, StaticSkip  # noqa: E402

# Dream-org/Dream-v0-Base-7B's config.json (the fields the model reads).
DREAM_7B_CONFIG = {
    "model_type": "Dream", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 131072,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "mask_token_id": 151666,
    "pad_token_id": 151643, "eos_token_id": 151643, "torch_dtype": "bfloat16",
}
# The golden fixture's weights: a random model with std 0.02 predicts near-uniform distributions whose
# confidences (entropy above all) tie within float rounding, which no batch invariance can survive.
DREAM_FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "dream-reference"
K_VALUES = (0, 2, 4, 6)


class Denoiser:
    """denoise() over a forward (the model or a GraphRunner) that sums the FLOPs it spent."""

    def __init__(self, forward, policy, flops: FlopsModel | None = None) -> None:
        self.forward, self.policy, self.flops = forward, policy, flops
        self.sums: list[torch.Tensor] = []

    def __call__(self, ids, attention_mask, logits_at, cache=None, window=None):
        logits, trace = self.forward(ids, attention_mask, policy=self.policy, logits_at=logits_at, cache=cache, window=window)
        if self.flops is not None:
            self.sums.append(torch.stack([f.sum() for f in self.flops.forward(trace)]))
        return logits

    def flops_ratio(self) -> float:
        spent, full = torch.stack(self.sums).sum(0).tolist()
        return spent / full


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def random_dream(config: dict, device: torch.device, dtype: torch.dtype = torch.bfloat16):
    """A Dream-shaped model with random weights; q/k/v biases small, as trained ones are."""
    model = random_model(LLaDAConfig.from_dict(config), device).to(dtype)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.normal_(0.0, 0.02)
    return model.fuse_projections()


# ---- checks --------------------------------------------------------------------------------------
def padded_prompts(B: int, device, seed: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 13, (B,), generator=g)
    P = int(lengths.max())
    ids = torch.full((B, P), pad_id)
    mask = torch.zeros(B, P, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        ids[i, P - n:] = torch.randint(0, 120, (n,), generator=g)
        mask[i, P - n:] = 1
    return ids.to(device), (mask.to(device) if not bool(mask.all()) else None)


def checks(device: torch.device) -> dict:
    """Graphs = eager and batch 16 = batch 1 for Dream decoding, on the GPU."""
    model = load_model(str(DREAM_FIXTURE), dtype="float32", device=device).model
    mask_id, pad_id = model.cfg.mask_token_id, model.cfg.pad_token_id
    runner = GraphRunner(model)
    policies = {"none": NO_SKIP, "static": StaticSkip([1]), "random1": RandomSkip(1, model.cfg.n_layers, 7)}
    out = {"graphs_equal_eager": [], "batch16_equal_batch1": []}
    for alg in ("entropy", "maskgit_plus", "topk_margin"):
        for temperature in (0.0, 1.0):
            settings = DreamGenerationSettings(gen_length=16, steps=8, alg=alg, temperature=temperature)
            for name, policy in policies.items():
                for B, seed in ((1, 0), (16, 1)):
                    ids, mask = padded_prompts(B, device, seed, pad_id)
                    seeds = torch.arange(B, device=device) * 7919 + 1
                    eager = dream_generate(Denoiser(model, policy), ids, mask, settings, mask_id, seeds)
                    replayed = dream_generate(Denoiser(runner, policy), ids, mask, settings, mask_id, seeds)
                    out["graphs_equal_eager"].append([alg, temperature, name, B, bool(torch.equal(eager, replayed))])
                    if B == 16:
                        same = 0
                        for i in range(B):
                            real = slice(None) if mask is None else mask[i].bool()
                            alone = dream_generate(Denoiser(runner, policy), ids[i : i + 1, real], None, settings,
                                                   mask_id, seeds[i : i + 1])
                            same += bool(torch.equal(alone[0, -16:], replayed[i, -16:]))
                        out["batch16_equal_batch1"].append([alg, temperature, name, same, B])
    return out


# ---- speed ---------------------------------------------------------------------------------------
def bench_forward(model, device, repeat: int) -> list[dict]:
    rows = []
    n = model.cfg.n_layers
    for B in (1, 8):
        ids = torch.randint(0, 120000, (B, 1024), device=device)
        base = None
        for k in K_VALUES:
            policy = StaticSkip(STATIC_SETS[k]) if k else NO_SKIP
            ms = timed(lambda: model(ids, policy=policy, logits_at=slice(768, 1024)), device, repeat=repeat)
            base = base or ms
            rows.append({"B": B, "k": k, "ms": round(ms, 2), "time_vs_k0": round(ms / base, 4),
                         "blocks_vs_k0": round((n - k) / n, 4)})
    return rows


def bench_generation(model, family: str, device, repeat: int) -> list[dict]:
    rows = []
    runner = GraphRunner(model)
    flops = FlopsModel.of(model.cfg)
    mask_id = model.cfg.mask_token_id

    def decode(denoise, prompt):
        if family == "dream":
            return dream_generate(denoise, prompt, None, DreamGenerationSettings(256, 64, alg="entropy"), mask_id)
        return generate(denoise, prompt, None, GenerationSettings(256, 64, 256), mask_id)

    for B, ks in ((1, K_VALUES), (8, (0, 6))):
        prompt = torch.randint(0, 120000, (B, 512), device=device, generator=torch.Generator(device).manual_seed(B))
        base = None
        for k in ks:
            policy = StaticSkip(STATIC_SETS[k]) if k else NO_SKIP
            reset_peak(device)
            decode(Denoiser(runner, policy), prompt)  # warm-up: captures the graphs
            times = []
            for _ in range(repeat):
                sync(device)
                t = time.perf_counter()
                denoise = Denoiser(runner, policy, flops)
                decode(denoise, prompt)
                sync(device)
                times.append(time.perf_counter() - t)
            seconds = min(times)
            base = base or seconds
            rows.append({"B": B, "k": k, "seconds": round(seconds, 3), "tokens_per_s": round(B * 256 / seconds, 1),
                         "time_vs_k0": round(seconds / base, 4), "flops_vs_k0": round(denoise.flops_ratio(), 4),
                         "peak_gib": round(peak_gib(device) or 0, 2)})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--part", choices=("checks", "speed", "all"), default="all")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "torch": torch.__version__}
    if args.part in ("checks", "all"):
        results["checks"] = checks(device)
        c = results["checks"]
        print("graphs == eager:", sum(r[-1] for r in c["graphs_equal_eager"]), "of", len(c["graphs_equal_eager"]))
        print("batch16 == batch1 rows:", [f"{r[0]}/t{r[1]}/{r[2]}: {r[3]}/{r[4]}" for r in c["batch16_equal_batch1"]])
    if args.part in ("speed", "all"):
        for family, make in (("llada", lambda: random_model(LLADA_8B, device)),
                             ("dream", lambda: random_dream(DREAM_7B_CONFIG, device))):
            model = make()
            results[family] = {"forward": bench_forward(model, device, 5),
                               "generation": bench_generation(model, family, device, args.repeat)}
            for part, rows in results[family].items():
                for row in rows:
                    print(family, part, json.dumps(row))
            del model
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
