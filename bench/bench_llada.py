"""LLaDA-8B-shaped benchmarks on one GPU: our model against upstream, skipping against its FLOPs.

Random bf16 weights at LLaDA-8B's shape (32 blocks, d_model 4096, 32 heads, MLP 12288, vocab
126464). Every time is the median of repeats measured with CUDA events after warm-up. Sections:

  block       one block: ours (fused projections) eager and compiled, and upstream's.
  forward     full forward against the executed-block fraction: static k = 0, 2, 4, 6, 8 and
              routed skipping with decisions forced to 0 / 10 / 25 % skipped; time ratio next to
              the papers' and the whole-model FLOPs ratio; fraction of the measured matmul rate;
              the routing overhead per block (routed with nothing skipped against no routers).
              Two engines: "eager" (kernels launched from Python) and "fast" (compiled blocks,
              blocks and routers replayed from CUDA graphs, one host read per routed block).
  likelihood  Monte-Carlo likelihood throughput (mc_num 128, prompts ~200, answers 8-32 tokens).
  generation  diffusion decoding, prompt 512, gen_length 256, steps 256, block_length 256 and 32;
              per-step time over a window of steps, as tokens per second.
  checks      the fused, graph-replayed and fast paths give the plain path's logits and
              decisions; ours against upstream.

Upstream LLaDA is timed in the same run when ``--upstream DIR`` names a folder holding the package
``llada_upstream`` (its Oct-2025 ``modeling_llada.py`` with ``configuration_llada.py``, and
``generate.py``, ``get_log_likelihood.py``); it is not part of this repository. The full results
go to ``--out`` as JSON and a table is printed last.

    PYTHONPATH=. python bench/bench_llada.py --upstream .upstream --out results.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from lm_eval_dlmskip.decoding.generate import GenerationSettings, generate
from lm_eval_dlmskip.decoding.graphs import GraphRunner
from lm_eval_dlmskip.decoding.likelihood import LikelihoodSettings, mc_loglikelihood, request_generator
from lm_eval_dlmskip.models.config import LLaDAConfig
from lm_eval_dlmskip.models.llada import LLaDA, rotary_tables
from lm_eval_dlmskip.skipping.flops import FlopsModel
from lm_eval_dlmskip.skipping.policies import SkipTrace, StaticSkip
from lm_eval_dlmskip.skipping.routers import RoutedSkip, RouterConfig, Routers

LLADA_8B = LLaDAConfig(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288,
                       vocab_size=126464, max_sequence_length=4096, mask_token_id=126336, rope_theta=500000.0)
TINY = replace(LLADA_8B, d_model=64, n_layers=8, n_heads=4, n_kv_heads=4, mlp_hidden_size=128, vocab_size=300,
               mask_token_id=299)
STATIC_SETS = {0: [], 2: [4, 6], 4: [2, 4, 6, 8], 6: [2, 4, 6, 8, 10, 12], 8: [2, 4, 6, 8, 10, 12, 14, 16]}
PAD_ID = 126081  # LLaDA's <|endoftext|>


# ---- timing ------------------------------------------------------------------------------------
def timed(fn, device: torch.device, repeat: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()``: CUDA events on a GPU, the host clock on a CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def matmul_tflops(device: torch.device) -> float:
    n = 8192 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = timed(lambda: a @ b, device, repeat=20)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ---- models ------------------------------------------------------------------------------------
@torch.no_grad()
def random_model(cfg: LLaDAConfig, device: torch.device, seed: int = 0) -> LLaDA:
    """LLaDA with random bf16 weights made on the device, projections fused as the loader does."""
    with torch.device("meta"):
        model = LLaDA(cfg).to(torch.bfloat16)
    model.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=generator)
    return model.eval().fuse_projections()


class Upstream:
    """Upstream's LLaDAModel sharing our weights, run with the SDPA flags it sets for itself."""

    def __init__(self, root: str, ours: LLaDA) -> None:
        sys.path.insert(0, root)
        from dataclasses import fields

        import llada_upstream.generate as up_generate
        import llada_upstream.get_log_likelihood as up_likelihood
        from llada_upstream.configuration_llada import ModelConfig
        from llada_upstream.modeling_llada import LLaDAModel

        cfg = ours.cfg
        raw = {"d_model": cfg.d_model, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "n_layers": cfg.n_layers,
               "mlp_hidden_size": cfg.mlp_hidden_size, "mlp_ratio": 4, "vocab_size": cfg.vocab_size,
               "embedding_size": cfg.vocab_size, "max_sequence_length": cfg.max_sequence_length, "rope": True,
               "rope_theta": cfg.rope_theta, "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms",
               "include_bias": False, "weight_tying": False, "alibi": False, "rope_full_precision": True,
               "rms_norm_eps": cfg.rms_norm_eps, "mask_token_id": cfg.mask_token_id, "init_device": "meta",
               "flash_attention": False, "attention_layer_norm": False, "block_group_size": 1}
        names = {f.name for f in fields(ModelConfig)}
        before = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled())
        self.model = LLaDAModel(ModelConfig(**{k: v for k, v in raw.items() if k in names}), init_params=False)
        self.flags = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled())
        self._set_flags(before)  # its constructor changes global SDPA flags; ours keep PyTorch's defaults
        state = {f"transformer.{k}": v for k, v in ours.state_dict().items()}
        self.model.load_state_dict(state, strict=True, assign=True)
        self.model.eval()
        self.generate = up_generate.generate
        self.get_log_likelihood = up_likelihood.get_log_likelihood

    @staticmethod
    def _set_flags(flags: tuple[bool, bool]) -> None:
        torch.backends.cuda.enable_flash_sdp(flags[0])
        torch.backends.cuda.enable_mem_efficient_sdp(flags[1])

    @contextlib.contextmanager
    def running(self):
        saved = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled())
        self._set_flags(self.flags)
        try:
            yield self.model
        finally:
            self._set_flags(saved)


def forced_routers(cfg: LLaDAConfig, skipped: list[int], device: torch.device) -> Routers:
    """Routers whose votes are fixed: every token votes skip before ``skipped`` blocks, execute elsewhere.
    The router still runs in full, so its cost is measured."""
    routers = Routers(RouterConfig(cfg.d_model, cfg.n_layers, 512)).to(device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        for i, r in enumerate(routers.routers):
            r.net[-1].weight.zero_()
            r.net[-1].bias.copy_(torch.tensor([30.0, 0.0] if i in skipped else [0.0, 30.0]))
    return routers


def token_batch(cfg: LLaDAConfig, B: int, L: int, device: torch.device, masked_share: float = 0.25, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device).manual_seed(seed)
    ids = torch.randint(0, min(cfg.vocab_size, cfg.mask_token_id) - 1, (B, L), device=device, generator=g)
    return torch.where(torch.rand(B, L, device=device, generator=g) < masked_share, cfg.mask_token_id, ids)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


# ---- sections ----------------------------------------------------------------------------------
def bench_block(model: LLaDA, up: Upstream | None, device, shapes, repeat: int) -> list[dict]:
    """One block's time: ours eager, ours compiled, upstream's."""
    cfg, rows = model.cfg, []
    block = model.blocks[0]
    for B, L in shapes:
        x = torch.randn(B, L, cfg.d_model, device=device, dtype=torch.bfloat16)
        cos, sin = rotary_tables(torch.arange(L, device=device), cfg.head_dim, cfg.rope_theta)
        row = {"B": B, "L": L}
        with torch.no_grad():
            row["ours_ms"] = timed(lambda: block(x, cos, sin, None), device, repeat)
            with _compiled_blocks(model):
                row["ours_compiled_ms"] = timed(lambda: block(x, cos, sin, None), device, repeat)
            if up is not None:
                with up.running() as upstream:
                    up_block = upstream.transformer.blocks[0]
                    row["upstream_ms"] = timed(lambda: up_block(x), device, repeat)
        rows.append(row)
        print("block", json.dumps(row), flush=True)
    return rows


@contextlib.contextmanager
def _compiled_blocks(model: LLaDA):
    kernels = model.blocks[0].kernels
    model.compile_blocks()
    try:
        yield
    finally:
        for block in model.blocks:
            block.kernels = kernels


@contextlib.contextmanager
def engine(model: LLaDA, name: str):
    """``eager``: the model as loaded, kernels launched from Python; ``fast``: compiled blocks
    replayed with their routers from CUDA graphs (what llada_skip's generation uses with compile=True)."""
    if name == "eager":
        yield model
        return
    with _compiled_blocks(model):
        yield GraphRunner(model)


def bench_forward(model: LLaDA, up: Upstream | None, device, shapes, repeat: int, peak: float) -> list[dict]:
    """Full forward (LM head at every position, as upstream) against the executed-block fraction."""
    cfg, rows = model.cfg, []
    plain_flops = FlopsModel.of(cfg)
    routed_flops = FlopsModel.of(cfg, router_hidden=512)
    for B, L in shapes:
        ids = token_batch(cfg, B, L, device)
        for name in ("eager", "fast"):
            base_ms = None
            cases = [("static", k, StaticSkip(layers), plain_flops) for k, layers in STATIC_SETS.items()
                     if max(layers, default=0) < cfg.n_layers]
            for share in (0.0, 0.10, 0.25):
                skipped = list(range(cfg.n_layers - round(share * cfg.n_layers), cfg.n_layers))  # late blocks
                routers = forced_routers(cfg, skipped, device)
                policy = RoutedSkip(routers, 0.1)
                cases.append(("routed", len(skipped), policy if name == "eager" else policy.compiled(), routed_flops))
            with engine(model, name) as forward, torch.no_grad():
                for method, k, policy, flops in cases:
                    reset_peak(device)
                    ms = timed(lambda: forward(ids, policy=policy), device, repeat)
                    _, trace = forward(ids, policy=policy)
                    spent, full = flops.forward(trace)
                    base_ms = base_ms or ms
                    row = {"B": B, "L": L, "engine": name, "method": method, "k": k, "ms": ms, "time_ratio": ms / base_ms,
                           "flops_ratio_papers": trace.executed.float().mean().item(),
                           "flops_ratio_whole_model": (spent.sum() / full.sum()).item(),
                           "matmul_fraction": spent.sum().item() / (ms * 1e-3) / (peak * 1e12), "peak_gib": peak_gib(device)}
                    if method == "routed" and k == 0:
                        static0 = next(r["ms"] for r in rows if r["B"] == B and r["L"] == L and r.get("engine") == name
                                       and r["method"] == "static" and r["k"] == 0)
                        row["routing_overhead_us_per_block"] = (ms - static0) / cfg.n_layers * 1e3
                        row["routing_overhead_pct_of_block"] = 100 * (ms - static0) / static0
                    rows.append(row)
                    print("forward", json.dumps(row), flush=True)
        if up is not None:
            reset_peak(device)
            with torch.no_grad(), up.running() as upstream:
                ms = timed(lambda: upstream(ids), device, repeat)
            _, full = plain_flops.forward(SkipTrace(torch.ones(B, cfg.n_layers, dtype=torch.bool), torch.full((B,), L),
                                                    torch.full((B,), L), torch.zeros(B)))
            row = {"B": B, "L": L, "engine": "upstream", "method": "upstream", "k": 0, "ms": ms,
                   "matmul_fraction": full.sum().item() / (ms * 1e-3) / (peak * 1e12), "peak_gib": peak_gib(device)}
            rows.append(row)
            print("forward", json.dumps(row), flush=True)
    return rows


def bench_likelihood(model: LLaDA, up: Upstream | None, device, n_requests: int, batch_requests: int, mc_num: int) -> dict:
    """Monte-Carlo likelihood throughput: ours eager and compiled (request batches of ``batch_requests``,
    16 samples each per forward), upstream's get_log_likelihood one request at a time (mini-batch 16)."""
    cfg = model.cfg
    rng = random.Random(0)
    vocab = min(cfg.vocab_size, cfg.mask_token_id) - 2
    requests = [([rng.randrange(vocab) for _ in range(rng.randint(190, 210))],
                 [rng.randrange(vocab) for _ in range(rng.randint(8, 32))]) for _ in range(n_requests)]
    settings = LikelihoodSettings(mc_num=mc_num, mc_batch=16)

    def denoise(ids, attention_mask, logits_at):
        return model(ids, attention_mask, logits_at=logits_at)[0]

    def ours():
        for start in range(0, n_requests, batch_requests):
            chunk = requests[start : start + batch_requests]
            gens = [request_generator(0, p, a) for p, a in chunk]
            mc_loglikelihood(denoise, [p for p, _ in chunk], [a for _, a in chunk], settings, cfg.mask_token_id,
                             PAD_ID % cfg.vocab_size, gens, device)

    out = {"requests": n_requests, "mc_num": mc_num, "batch_requests": batch_requests}
    for name, context in (("eager", contextlib.nullcontext()), ("compiled", _compiled_blocks(model))):
        with context, torch.no_grad():
            ours()  # warm-up: allocator, kernels, compilation
            reset_peak(device)
            ms = timed(ours, device, repeat=1, warmup=0)
        out[f"{name}_req_per_s"] = n_requests / (ms / 1e3)
        out[f"{name}_peak_gib"] = peak_gib(device)
    if up is not None:
        with torch.no_grad(), up.running() as upstream:
            def theirs():
                for p, a in requests:
                    up.get_log_likelihood(upstream, torch.tensor(p, device=device), torch.tensor(a, device=device),
                                          mc_num=mc_num, batch_size=16, mask_id=cfg.mask_token_id)
            up.get_log_likelihood(upstream, torch.tensor(requests[0][0], device=device),
                                  torch.tensor(requests[0][1], device=device), mc_num=16, batch_size=16, mask_id=cfg.mask_token_id)
            reset_peak(device)
            ms = timed(theirs, device, repeat=1, warmup=0)
        out.update(upstream_req_per_s=n_requests / (ms / 1e3), upstream_peak_gib=peak_gib(device))
        for name in ("eager", "compiled"):
            out[f"{name}_speedup"] = out[f"{name}_req_per_s"] / out["upstream_req_per_s"]
    print("likelihood", json.dumps(out), flush=True)
    return out


class _Enough(Exception):
    """Raised by the step clock once it has timed its window of denoising steps."""


class StepClock:
    """Records a CUDA event at every denoiser call; stops generation after warm-up + window."""

    def __init__(self, device: torch.device, warmup: int, window: int) -> None:
        self.device, self.warmup, self.window = device, warmup, window
        self.marks: list = []

    def tick(self) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
        if len(self.marks) > self.warmup + self.window:
            raise _Enough

    def step_ms(self) -> float:
        a, b = self.marks[self.warmup], self.marks[self.warmup + self.window]
        if self.device.type == "cuda":
            b.synchronize()
            return a.elapsed_time(b) / self.window
        return (b - a) * 1e3 / self.window


def bench_generation(model: LLaDA, up: Upstream | None, device, cases, warmup: int, window: int) -> list[dict]:
    cfg, rows = model.cfg, []
    for B, P, gen_length, steps, block_length in cases:
        prompt = token_batch(cfg, B, P, device, masked_share=0.0, seed=1)
        settings = GenerationSettings(gen_length, steps, block_length)
        row = {"B": B, "prompt": P, "gen_length": gen_length, "steps": steps, "block_length": block_length}
        for name in ("eager", "fast"):
            clock = StepClock(device, warmup, window)
            with engine(model, name) as forward:
                def denoise(ids, attention_mask, logits_at):
                    clock.tick()
                    return forward(ids, attention_mask, logits_at=logits_at)[0]

                reset_peak(device)
                with contextlib.suppress(_Enough), torch.no_grad():
                    generate(denoise, prompt, None, settings, cfg.mask_token_id)
            ms = clock.step_ms()
            row.update({f"{name}_step_ms": ms, f"{name}_tokens_per_s": B * gen_length / steps / (ms / 1e3),
                        f"{name}_peak_gib": peak_gib(device)})
        if up is not None:
            clock = StepClock(device, warmup, window)

            class Counted(torch.nn.Module):
                def __init__(self, inner):
                    super().__init__()
                    self.inner = inner

                @property
                def device(self):
                    return self.inner.device

                def forward(self, x, attention_mask=None):
                    clock.tick()
                    return self.inner(x, attention_mask=attention_mask)

            reset_peak(device)
            with contextlib.suppress(_Enough), torch.no_grad(), up.running() as upstream:
                up.generate(Counted(upstream), prompt, steps=steps, gen_length=gen_length, block_length=block_length,
                            temperature=0.0, mask_id=cfg.mask_token_id)
            ms_up = clock.step_ms()
            row.update(upstream_step_ms=ms_up, upstream_tokens_per_s=B * gen_length / steps / (ms_up / 1e3),
                       upstream_peak_gib=peak_gib(device))
            for name in ("eager", "fast"):
                row[f"{name}_speedup"] = ms_up / row[f"{name}_step_ms"]
        rows.append(row)
        print("generation", json.dumps(row), flush=True)
    return rows


@torch.no_grad()
def checks(model: LLaDA, up: Upstream | None, device) -> dict:
    """The fused path against the per-module path (same weights), the graph-replayed and the fast
    (compiled + graphs) forward's logits and routed decisions against eager, ours against upstream."""
    cfg = model.cfg
    ids = token_batch(cfg, 2, 256, device, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :37] = 0
    fast, _ = model(ids, mask)
    saved = [block._fused for block in model.blocks]
    for block in model.blocks:
        block._fused = {}  # the per-module path
    plain, _ = model(ids, mask)
    for block, fused in zip(model.blocks, saved):
        block._fused = fused
    out = {"fast_vs_plain_rel_err": rel_err(fast[mask.bool()], plain[mask.bool()])}
    torch.manual_seed(0)
    routers = Routers(RouterConfig(cfg.d_model, cfg.n_layers, 512, init_bias=0.0)).to(device=device, dtype=torch.bfloat16)
    for r in routers.routers:
        torch.nn.init.normal_(r.net[-1].weight, std=0.5)
    batch_ids = token_batch(cfg, 8, 256, device, masked_share=0.5, seed=4)
    _, eager_trace = model(batch_ids, policy=RoutedSkip(routers, 0.1))
    out["routed_blocks_executed_share"] = eager_trace.executed.float().mean().item()
    logits_e, _ = model(batch_ids, policy=RoutedSkip(routers, 0.1))
    logits_g, trace_g = GraphRunner(model)(batch_ids, policy=RoutedSkip(routers, 0.1))
    out["graphs_decisions_equal"] = bool(torch.equal(trace_g.executed, eager_trace.executed))
    out["graphs_vs_eager_rel_err"] = rel_err(logits_g, logits_e)
    plain_logits, _ = model(batch_ids)
    with engine(model, "fast") as fast_forward:
        logits_f, _ = fast_forward(batch_ids)
        _, trace_f = fast_forward(batch_ids, policy=RoutedSkip(routers, 0.1).compiled())
    # Compiled kernels round bf16 differently: the same function to bf16 precision, and routed
    # decisions agree except where a token's two router logits are within that rounding.
    out["compiled_vs_eager_rel_err"] = rel_err(logits_f, plain_logits)
    out["compiled_decision_agreement"] = (trace_f.executed == eager_trace.executed).float().mean().item()
    if up is not None:
        with up.running() as upstream:
            theirs = upstream(ids, attention_mask=mask).logits
        out["ours_vs_upstream_rel_err"] = rel_err(fast[mask.bool()], theirs[mask.bool()])
    print("checks", json.dumps(out), flush=True)
    return out


# ---- report ------------------------------------------------------------------------------------
def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(results: dict) -> str:
    lines = [f"device {results['device']} | torch {results['torch']} | bf16 matmul {results['matmul_tflops']:.0f} TFLOP/s"]
    for r in results.get("block", []):
        up = f"{r['upstream_ms']:.3f}" if "upstream_ms" in r else "-"
        lines.append(f"block B={r['B']:<2} L={r['L']:<5} ours {r['ours_ms']:.3f} ms, compiled {r['ours_compiled_ms']:.3f}, upstream {up}")
    for r in results.get("forward", []):
        head = f"forward B={r['B']:<2} L={r['L']:<5} {r['engine']:<8}"
        if r["method"] == "upstream":
            lines.append(f"{head} upstream     {r['ms']:8.2f} ms  matmul {100 * r['matmul_fraction']:.0f}%")
            continue
        over = (f"  routing +{r['routing_overhead_us_per_block']:.0f} us/block ({r['routing_overhead_pct_of_block']:.1f}%)"
                if "routing_overhead_us_per_block" in r else "")
        lines.append(f"{head} {r['method']:<7} k={r['k']:<2} {r['ms']:8.2f} ms  time {r['time_ratio']:.4f}  "
                     f"FLOPs papers {r['flops_ratio_papers']:.4f} whole {r['flops_ratio_whole_model']:.4f}  "
                     f"matmul {100 * r['matmul_fraction']:.0f}%{over}")
    lk = results.get("likelihood")
    if lk:
        lines.append(f"likelihood mc_num {lk['mc_num']}: eager {lk['eager_req_per_s']:.3f} req/s (peak {_gib(lk['eager_peak_gib'])} GiB), "
                     f"compiled {lk['compiled_req_per_s']:.3f} req/s (peak {_gib(lk['compiled_peak_gib'])} GiB)"
                     + (f", upstream {lk['upstream_req_per_s']:.3f} req/s (peak {_gib(lk['upstream_peak_gib'])} GiB): "
                        f"x{lk['eager_speedup']:.2f} / x{lk['compiled_speedup']:.2f}" if "upstream_req_per_s" in lk else ""))
    for r in results.get("generation", []):
        lines.append(f"generate B={r['B']} block {r['block_length']:<3}: eager {r['eager_tokens_per_s']:.1f} tok/s, "
                     f"fast {r['fast_tokens_per_s']:.1f} tok/s ({r['fast_step_ms']:.1f} ms/step, peak {_gib(r['fast_peak_gib'])} GiB)"
                     + (f", upstream {r['upstream_tokens_per_s']:.1f} tok/s (peak {_gib(r['upstream_peak_gib'])} GiB): "
                        f"x{r['eager_speedup']:.2f} / x{r['fast_speedup']:.2f}" if "upstream_step_ms" in r else ""))
    if "checks" in results:
        lines.append("checks " + json.dumps(results["checks"]))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", help="folder holding the llada_upstream package (upstream code, not in this repo)")
    parser.add_argument("--out", default="bench_results.json")
    parser.add_argument("--sections", default="checks,block,forward,likelihood,generation")
    parser.add_argument("--likelihood-batch", type=int, default=4, help="requests per batch in our likelihood")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--gen-window", type=int, default=24, help="denoising steps timed per generation case")
    parser.add_argument("--tiny", action="store_true", help="a small model on the CPU: a smoke test of this script")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    cfg = TINY if args.tiny else LLADA_8B
    sections = args.sections.split(",")
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    results["matmul_tflops"] = matmul_tflops(device)
    model = random_model(cfg, device)
    up = Upstream(args.upstream, model) if args.upstream else None
    S = 32 if args.tiny else 1
    if "checks" in sections:
        results["checks"] = checks(model, up, device)
    if "block" in sections:
        shapes = [(1, 512), (1, 1024), (8, 512), (8, 1024)]
        results["block"] = bench_block(model, up, device, [(b, max(16, l // S)) for b, l in shapes], args.repeat)
    if "forward" in sections:
        shapes = [(1, 512), (1, 1024), (8, 1024)]
        results["forward"] = bench_forward(model, up, device, [(b, max(16, l // S)) for b, l in shapes], args.repeat,
                                           results["matmul_tflops"])
    if "likelihood" in sections:
        results["likelihood"] = bench_likelihood(model, up, device, n_requests=4 if args.tiny else 16,
                                                 batch_requests=args.likelihood_batch, mc_num=16 if args.tiny else 128)
    if "generation" in sections:
        P, G = (16, 8) if args.tiny else (512, 256)
        cases = [(1, P, G, G, G), (1, P, G, G, G // 8), (8, P, G, G, G), (8, P, G, G, G // 8)]
        results["generation"] = bench_generation(model, up, device, cases, warmup=2 if args.tiny else 4,
                                                 window=4 if args.tiny else args.gen_window)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
