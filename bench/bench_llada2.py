"""LLaDA2 (mixture of experts) on one GPU (issue 21): LLaDA2.0-mini's shape with random bf16 weights.

checks  the grouped expert GEMMs equal one product per expert (the same MoE, bf16) on the GPU, and
        block diffusion with the exact KV cache equals recomputing the prefix (upstream's way) token
        for token at batch 1 and in a padded batch of 8, with and without static skipping.
speed   prompt 512, gen 256, blocks of 32, 1 or 4 tokens per step (threshold 1: the quotas alone),
        batch 1 and 8, with and without static skipping: tokens per second of whole decodes, peak
        memory; a profile of one cached forward (a block of 32 per row): the share of the time in
        the expert GEMMs and the bandwidth they reach (bytes of the experts used / their time).

    PYTHONPATH=. python bench/bench_llada2.py --out llada2.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

import torch

from lm_eval_dlmskip.decoding.block_diffusion import BlockDiffusionSettings, block_generate
from lm_eval_dlmskip.models import moe as moe_module
from lm_eval_dlmskip.models.config import LLaDAConfig
from lm_eval_dlmskip.models.llada import LLaDA
from lm_eval_dlmskip.skipping.policies import NO_SKIP, StaticSkip

# LLaDA2.0-mini as public code describes it (tests/fixtures/llada2-reference/README.md)
MINI = {
    "model_type": "llada2_moe", "vocab_size": 157184, "hidden_size": 2048, "num_hidden_layers": 20,
    "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 5120,
    "use_qkv_bias": False, "use_bias": False, "use_qk_norm": True, "rms_norm_eps": 1e-6, "rope_theta": 600000.0,
    "partial_rotary_factor": 0.5, "num_experts": 256, "num_shared_experts": 1, "num_experts_per_tok": 8,
    "n_group": 8, "topk_group": 4, "moe_intermediate_size": 512, "first_k_dense_replace": 1,
    "routed_scaling_factor": 2.5, "max_position_embeddings": 32768, "mask_token_id": 156895, "eos_token_id": 156892,
}
MASK, EOS = 156895, 156892


def random_model(cfg: LLaDAConfig, device: torch.device, seed: int = 0) -> LLaDA:
    with torch.device("meta"):
        model = LLaDA(cfg).to(torch.bfloat16)
    model.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)
        for name, b in model.named_buffers():
            b.normal_(0.0, 0.01, generator=generator)  # expert_bias
    return model.eval().fuse_projections()


def denoiser(model, policy):
    def denoise(ids, attention_mask, logits_at, cache=None, window=None, **options):
        return model(ids, attention_mask, policy=policy, logits_at=logits_at, cache=cache, window=window, **options)[0]
    return denoise


def prompts(batch: int, length: int, vocab: int = 150000, ragged: bool = False) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (length - (7 * i if ragged else 0),), generator=g).tolist() for i in range(batch)]


def checks(model, device, vocab: int = 150000) -> dict:
    out = {}
    x = torch.randn(64, model.cfg.d_model, device=device, dtype=model.dtype)
    moe = model.blocks[1].moe
    chosen, weights = moe_module.route(x, moe.gate, moe.expert_bias, moe.moe)
    grouped = moe_module.experts(x, chosen, weights, moe.gate_up, moe.down)
    grouped_mm, moe_module._GROUPED_MM = moe_module._GROUPED_MM, None
    looped = moe_module.experts(x, chosen, weights, moe.gate_up, moe.down)
    moe_module._GROUPED_MM = grouped_mm
    out["grouped_vs_loop_max_abs"] = (grouped.float() - looped.float()).abs().max().item()
    out["grouped_mm_available"] = grouped_mm is not None
    settings = BlockDiffusionSettings(gen_length=64, block_length=32, steps=32, threshold=0.9)
    for policy_name, policy in (("none", NO_SKIP), ("static4", StaticSkip({3, 7, 11, 15}))):
        for batch, ragged in ((1, False), (8, True)):
            p = prompts(batch, 100, vocab, ragged)
            cached = block_generate(denoiser(model, policy), p, settings, MASK, EOS, EOS, device)
            plain = block_generate(denoiser(model, policy), p, replace(settings, cache="none"), MASK, EOS, EOS, device)
            alone = torch.cat([block_generate(denoiser(model, policy), [q], settings, MASK, EOS, EOS, device) for q in p])
            out[f"cache_equals_recompute_{policy_name}_b{batch}"] = bool(torch.equal(cached, plain))
            out[f"batch_equals_alone_{policy_name}_b{batch}"] = bool(torch.equal(cached, alone))
    return out


def speed(model, device, batch: int, per_step: int, policy, gen: int = 256, prompt: int = 512) -> dict:
    settings = BlockDiffusionSettings(gen_length=gen, block_length=32, steps=32 // per_step, threshold=1.0)
    p = prompts(batch, prompt)
    block_generate(denoiser(model, policy), p, replace(settings, gen_length=64), MASK, EOS, EOS, device)  # warm up
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    block_generate(denoiser(model, policy), p, settings, MASK, EOS, EOS, device)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - tic
    return {"batch": batch, "tokens_per_step": per_step, "seconds": seconds, "tokens_per_s": batch * gen / seconds,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def profile(model, device, batch: int) -> dict:
    """One cached window forward (a block of 32 per row over a 544-token prefix): the share of the
    GPU time in the grouped expert GEMMs, and the bandwidth they reach over the bytes of the
    experts the forward's tokens were actually routed to."""
    from lm_eval_dlmskip.models.execution import KVCache

    ids = torch.randint(0, 150000, (batch, 576), device=device)
    cache = KVCache()
    used: list[int] = []
    route = moe_module.route

    def counting(x, gate, bias, moe):  # the experts each layer's tokens use, counted in the profiled forwards
        chosen, weights = route(x, gate, bias, moe)
        used.append(chosen.unique().numel())
        return chosen, weights

    with torch.no_grad():
        model(ids, block_length=32, cache=cache, window=slice(0, 544))
        for _ in range(3):
            model(ids, block_length=32, cache=cache, window=slice(544, 576), logits_at=slice(0, 32))
        torch.cuda.synchronize()
        moe_module.route = counting
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                model(ids, block_length=32, cache=cache, window=slice(544, 576), logits_at=slice(0, 32))
            torch.cuda.synchronize()
        moe_module.route = route
    events = [e for e in prof.key_averages() if e.device_time_total]
    total = sum(e.device_time_total for e in events) / 5
    grouped = sum(e.device_time_total for e in events if "GroupProblemShape" in e.key or "grouped" in e.key.lower()) / 5
    cfg = model.cfg
    bytes_used = sum(used) / 5 * 3 * cfg.d_model * cfg.moe.expert_hidden * 2  # per forward: gate, up, down of each
    top = sorted(((e.device_time_total / 5, e.key[:80]) for e in events), reverse=True)[:10]
    return {"batch": batch, "forward_us": total, "expert_gemm_us": grouped, "expert_share": grouped / total,
            "experts_used_per_moe_layer": sum(used) / len(used), "expert_gb": bytes_used / 1e9,
            "expert_bandwidth_tb_s": bytes_used / (grouped * 1e-6) / 1e12, "top_kernels_us": top}


def exactness_fp32(device) -> dict:
    """Cache vs recompute and batch vs alone in float32 on a 4-layer model of LLaDA2-mini's widths
    with peaked predictions (random bf16 weights near-tie over 157k tokens: rounding then picks)."""
    shape = {**MINI, "num_hidden_layers": 4, "vocab_size": 4096, "mask_token_id": 4000, "eos_token_id": 4001}
    model = random_model(LLaDAConfig.from_dict(shape), device).float()
    with torch.no_grad():
        model.ff_out.weight.mul_(40.0)  # peaked logits
    global MASK, EOS
    MASK, EOS = 4000, 4001
    try:
        return checks(model, device, vocab=3000)
    finally:
        MASK, EOS = 156895, 156892


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="llada2.json")
    parser.add_argument("--tiny", action="store_true", help="a small model on the CPU: a smoke test of this script")
    parser.add_argument("--sections", default="checks,speed,profile,exact")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    tiny = {"hidden_size": 64, "num_hidden_layers": 3, "head_dim": 16, "intermediate_size": 64, "num_experts": 16,
            "moe_intermediate_size": 16, "n_group": 4, "topk_group": 2}
    shape = {**MINI, **tiny} if args.tiny else MINI
    cfg = LLaDAConfig.from_dict(shape)
    model = random_model(cfg, device)
    result = {"device": "cpu" if args.tiny else torch.cuda.get_device_name(), "torch": torch.__version__,
              "params_b": sum(p.numel() for p in model.parameters()) / 1e9}
    print(json.dumps(result), flush=True)
    sections = args.sections.split(",")
    if "checks" in sections:
        result["checks"] = checks(model, device)
        print(json.dumps(result["checks"]), flush=True)
    if args.tiny:
        print(json.dumps(speed(model, device, 2, 4, NO_SKIP, gen=64, prompt=40)))
        return 0
    if "speed" in sections:
        result["speed"] = []
        for batch in (1, 8):
            for per_step in (1, 4):
                for name, policy in (("none", NO_SKIP), ("static4", StaticSkip({3, 7, 11, 15}))):
                    row = {"policy": name, **speed(model, device, batch, per_step, policy)}
                    result["speed"].append(row)
                    print(json.dumps(row), flush=True)
    if "profile" in sections:
        result["profile"] = [profile(model, device, b) for b in (1, 8)]
        print(json.dumps(result["profile"]), flush=True)
    if "exact" in sections:
        del model
        torch.cuda.empty_cache()
        result["exact_fp32"] = exactness_fp32(device)
        print(json.dumps(result["exact_fp32"]), flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
