"""Cached and parallel diffusion decoding with skipping, on one GPU (issues 8 and 9).

checks  (the tiny fixture model in float32 on the GPU) generation replayed from CUDA graphs equals
        eager generation token for token, over left-padded batches with mixed padding, for every
        cache mode and skip policy, at batch 1 and 16; batch 16 equals batch 1 row by row.
speed   (LLaDA-8B shape, random bf16 weights) prompt 512, gen 256, block 32: tokens per second of
        whole generate() calls for cache none/prefix/dual, 1, 2 or 4 tokens per step (steps 256,
        128, 64), static skipping of k blocks and routed skipping with decisions forced to 25%
        (decided once per block, or at every step), with peak memory; the same shapes through
        Fast-dLLM's own ``generate_with_dual_cache`` when ``--fastdllm DIR`` names its checkout
        (not part of this repository; its modeling file needs einops).

    PYTHONPATH=. python bench/bench_cached.py --fastdllm .fastdllm --out cached.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_llada import LLADA_8B, forced_routers, peak_gib, random_model, reset_peak  # noqa: E402

from lm_eval_dlmskip.decoding.generate import GenerationSettings, generate  # noqa: E402
from lm_eval_dlmskip.decoding.graphs import GraphRunner  # noqa: E402
from lm_eval_dlmskip.models.loading import load_llada  # noqa: E402
from lm_eval_dlmskip.skipping.flops import FlopsModel  # noqa: E402
from lm_eval_dlmskip.skipping.policies import NO_SKIP, RandomSkip, StaticSkip  # noqa: E402
from lm_eval_dlmskip.skipping.routers import RoutedSkip, RouterConfig, Routers  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "llada-tiny-reference"
STATIC = {4: [2, 4, 6, 8], 8: [2, 4, 6, 8, 10, 12, 14, 16]}


class Denoiser:
    """denoise() over a forward (the model or a GraphRunner) that sums the FLOPs it spent."""

    def __init__(self, forward, policy, flops: FlopsModel | None = None) -> None:
        self.forward, self.policy, self.flops = forward, policy, flops
        self.sums: list[torch.Tensor] = []  # [spent, full] per forward, read after the run
        self.forwards = 0

    def __call__(self, ids, attention_mask, logits_at, cache=None, window=None):
        logits, trace = self.forward(ids, attention_mask, policy=self.policy, logits_at=logits_at, cache=cache, window=window)
        self.forwards += 1
        if self.flops is not None:
            self.sums.append(torch.stack([f.sum() for f in self.flops.forward(trace)]))
        return logits

    def flops_spent(self) -> tuple[float, float]:
        spent, full = torch.stack(self.sums).sum(0).tolist()
        return spent, full


# ---- checks --------------------------------------------------------------------------------------
def padded_prompts(B: int, device, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 13, (B,), generator=g)
    P = int(lengths.max())
    ids = torch.full((B, P), 251)
    mask = torch.zeros(B, P, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        ids[i, P - n:] = torch.randint(0, 240, (n,), generator=g)
        mask[i, P - n:] = 1
    return ids.to(device), (mask.to(device) if not bool(mask.all()) else None)


def tiny_routers(device) -> Routers:
    torch.manual_seed(0)
    routers = Routers(RouterConfig(d_model=64, n_layers=6, hidden=16, init_bias=0.0))
    for r in routers.routers:
        torch.nn.init.normal_(r.net[-1].weight, std=3.0)
    return routers.to(device)


@torch.no_grad()
def checks(device) -> dict:
    model = load_llada(str(FIXTURE), dtype="float32", device=device).model
    policies = {"none": NO_SKIP, "static": StaticSkip({1, 4}), "random": RandomSkip(2, 6, seed=0),
                "routed": RoutedSkip(tiny_routers(device), 0.1)}
    modes = [("none", None, "step"), ("prefix", None, "block"), ("dual", 0.5, "block"), ("dual", 0.5, "step")]
    out = {"graphs_equal_eager": [], "batch16_equal_batch1": []}
    for cache, threshold, decide in modes:
        settings = GenerationSettings(16, 16, 8, cache=cache, threshold=threshold, decide_every=decide)
        for name, policy in policies.items():
            runner = GraphRunner(model)
            for B, seed in ((1, 0), (16, 1), (16, 2)):
                ids, mask = padded_prompts(B, device, seed)
                eager = generate(Denoiser(model, policy), ids, mask, settings, 250)
                replayed = generate(Denoiser(runner, policy), ids, mask, settings, 250)
                out["graphs_equal_eager"].append([cache, threshold, decide, name, B, bool(torch.equal(eager, replayed))])
                if B == 16:
                    rows = []
                    for i in range(B):
                        real = slice(None) if mask is None else mask[i].bool()
                        alone = generate(Denoiser(runner, policy), ids[i : i + 1, real], None, settings, 250)
                        rows.append(bool(torch.equal(alone[0, -16:], replayed[i, -16:])))
                    out["batch16_equal_batch1"].append([cache, threshold, decide, name, seed, sum(rows), B])
    out["all_graphs_equal"] = all(r[-1] for r in out["graphs_equal_eager"])
    out["all_batch_equal"] = all(r[-2] == r[-1] for r in out["batch16_equal_batch1"])
    print("checks", json.dumps({k: out[k] for k in ("all_graphs_equal", "all_batch_equal")}), flush=True)
    return out


# ---- speed ---------------------------------------------------------------------------------------
def prompts_8b(B: int, P: int, device) -> torch.Tensor:
    g = torch.Generator(device).manual_seed(B)
    return torch.randint(0, 126000, (B, P), device=device, generator=g)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_generate(forward, policy, prompt, settings: GenerationSettings, flops: FlopsModel, repeat: int) -> dict:
    reset_peak(prompt.device)
    generate(Denoiser(forward, policy), prompt, None, settings, LLADA_8B.mask_token_id)  # warm-up: captures graphs
    times = []
    for _ in range(repeat):
        sync(prompt.device)
        t = time.perf_counter()
        denoise = Denoiser(forward, policy, flops)
        generate(denoise, prompt, None, settings, LLADA_8B.mask_token_id)
        sync(prompt.device)
        times.append(time.perf_counter() - t)
    seconds = min(times)
    B = prompt.shape[0]
    spent, full = denoise.flops_spent()
    return {"seconds": round(seconds, 4), "tokens_per_s": round(B * settings.gen_length / seconds, 1),
            "nfe": denoise.forwards, "flops_ratio_vs_no_skip": round(spent / full, 4),
            "tflops": round(spent / 1e12, 2), "peak_gib": round(peak_gib(prompt.device) or 0, 2)}


def fast_dllm(root: str, model, prompt, steps: int, repeat: int) -> dict:
    """Fast-dLLM's LLaDA sharing our weights, timed in its own generate_with_dual_cache."""
    sys.path.insert(0, str(Path(root) / "llada"))
    from generate import generate_with_dual_cache
    from model.configuration_llada import LLaDAConfig as FastConfig
    from model.modeling_llada import LLaDAModel, LLaDAModelLM, create_model_config_from_pretrained_config

    cfg = model.cfg
    config = FastConfig(d_model=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, n_layers=cfg.n_layers,
                        mlp_hidden_size=cfg.mlp_hidden_size, mlp_ratio=4, vocab_size=cfg.vocab_size,
                        embedding_size=cfg.vocab_size, max_sequence_length=cfg.max_sequence_length, rope=True,
                        rope_theta=cfg.rope_theta, block_type="llama", activation_type="silu", layer_norm_type="rms",
                        include_bias=False, weight_tying=False, alibi=False, rope_full_precision=True,
                        rms_norm_eps=cfg.rms_norm_eps, mask_token_id=cfg.mask_token_id, flash_attention=False,
                        attention_layer_norm=False, block_group_size=1)
    config.use_cache = False
    inner_cfg = create_model_config_from_pretrained_config(config)
    inner_cfg.init_device = "meta"
    with torch.device("meta"):
        inner = LLaDAModel(inner_cfg, init_params=False)
    fast = LLaDAModelLM(config, model=inner)
    state = {f"model.transformer.{k}": v for k, v in model.state_dict().items()}
    fast.load_state_dict(state, strict=True, assign=True)
    fast.eval()
    reset_peak(prompt.device)
    generate_with_dual_cache(fast, prompt, steps=steps, gen_length=256, block_length=32, mask_id=cfg.mask_token_id)
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t = time.perf_counter()
        _, nfe = generate_with_dual_cache(fast, prompt, steps=steps, gen_length=256, block_length=32, mask_id=cfg.mask_token_id)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {"seconds": round(min(times), 4), "tokens_per_s": round(256 / min(times), 1), "nfe": nfe,
            "peak_gib": round(peak_gib(prompt.device), 2)}


@torch.no_grad()
def speed(device, fastdllm: str | None, repeat: int, compile: bool, only_b1: bool, cfg=LLADA_8B,
          cases: set[str] | None = None) -> list[dict]:
    model = random_model(cfg, device)
    if compile:
        model.compile_blocks()
    runner = GraphRunner(model)
    base = GenerationSettings(256, 256, 32, cache="dual")
    rows = []

    def case(name: str, B: int, settings: GenerationSettings, policy=NO_SKIP, forward=runner, routed: bool = False):
        if cases and f"{name} B={B}" not in cases:
            return
        fl = FlopsModel.of(cfg, 512) if routed else FlopsModel.of(cfg)
        try:
            row = {"case": name, "B": B, **time_generate(forward, policy, prompts_8b(B, 512, device), settings, fl, repeat)}
        except Exception as err:  # noqa: BLE001  a failed case is reported, the others still run
            row = {"case": name, "B": B, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
        rows.append(row)
        print("speed", json.dumps(row), flush=True)

    batches = (1,) if only_b1 else (1, 8)
    for B in batches:
        case("dual", B, base)
        if B == 1:
            case("dual, no CUDA graphs", B, base, forward=model)
        case("prefix", B, replace(base, cache="prefix"))
        case("none", B, replace(base, cache="none"))
        case("dual 2/step", B, replace(base, steps=128))
        case("dual 4/step", B, replace(base, steps=64))
        for k, layers in STATIC.items():
            case(f"dual static k={k}", B, base, StaticSkip(layers))
    skipped = [1, 5, 9, 13, 17, 21, 25, 29]  # 8 of 32: 25%
    routed = RoutedSkip(forced_routers(cfg, skipped, device), 0.1)
    for decide in ("block", "step"):
        case(f"dual routed 25% decide={decide}", 1, replace(base, decide_every=decide), routed, routed=True)
    case("dual static 25% (same blocks)", 1, base, StaticSkip(skipped))
    if fastdllm and not cases:
        try:
            row = {"case": "Fast-dLLM dual", "B": 1, **fast_dllm(fastdllm, model, prompts_8b(1, 512, device), 256, 1)}
        except Exception as err:  # noqa: BLE001
            row = {"case": "Fast-dLLM dual", "B": 1, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
        rows.append(row)
        print("speed", json.dumps(row), flush=True)
    return rows


@torch.no_grad()
def profile(device, compile: bool) -> None:
    """Where one cached generation (B=1, dual, gen 64) spends GPU time: kernels by total time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model = random_model(LLADA_8B, device)
    if compile:
        model.compile_blocks()
    settings = GenerationSettings(64, 64, 32, cache="dual")
    prompt = prompts_8b(1, 512, device)
    for name, forward in (("graphs", GraphRunner(model)), ("eager", model)):
        generate(Denoiser(forward, NO_SKIP), prompt, None, settings, LLADA_8B.mask_token_id)
        sync(device)
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            generate(Denoiser(forward, NO_SKIP), prompt, None, settings, LLADA_8B.mask_token_id)
            sync(device)
            wall = time.perf_counter() - t
        events = prof.key_averages()
        gpu = sum(e.self_device_time_total for e in events) / 1e3
        print(f"profile {name}: wall {wall * 1e3:.1f} ms (under the profiler), GPU kernels {gpu:.1f} ms, 64 forwards")
        print(events.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=60))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="checks,speed")
    parser.add_argument("--fastdllm", help="a checkout of NVlabs/Fast-dLLM (not part of this repository)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="compile the blocks (torch.compile) as well")
    parser.add_argument("--only-b1", action="store_true")
    parser.add_argument("--cases", help="comma-separated 'name B=n' of the speed cases to run (default: all)")
    parser.add_argument("--tiny", action="store_true", help="a small model on the CPU: a smoke test of this script")
    parser.add_argument("--out", default="cached.json")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    results = {"device": "cpu" if args.tiny else torch.cuda.get_device_name(), "torch": torch.__version__, "compile": args.compile}
    if "checks" in args.sections:
        try:
            results["checks"] = checks(device)
        except Exception:  # noqa: BLE001  the speed section still runs; the traceback is in the log
            traceback.print_exc()
        Path(args.out).write_text(json.dumps(results, indent=1))
    if "speed" in args.sections:
        cfg = replace(LLADA_8B, d_model=64, n_layers=32, n_heads=4, n_kv_heads=4, mlp_hidden_size=128) if args.tiny else LLADA_8B
        cases = set(args.cases.split(",")) if args.cases else None
        results["speed"] = speed(device, args.fastdllm, args.repeat, args.compile, args.only_b1, cfg, cases)
        Path(args.out).write_text(json.dumps(results, indent=1))
    if "profile" in args.sections:
        profile(device, args.compile)
    for row in results.get("speed", []):
        print(f"{row['case']:<36} B={row['B']:<2} " + " ".join(f"{k}={v}" for k, v in row.items() if k not in ("case", "B")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
