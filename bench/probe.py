"""GPU probe: what this PyTorch build can do for the fast path, at LLaDA-8B block shape.

Prints: versions; whether torch.cond captured inside torch.cuda.graph becomes a device-side
conditional (no host sync); one block's time eager / with fused projections / compiled; SDPA time
with and without a key-padding mask; the router's cost eager, compiled and graph-captured.
Usage: python bench/probe.py
"""

import time

import torch
import torch.nn.functional as F
from bench_llada import timed as _timed

from lm_eval_dlmskip.models.config import LLaDAConfig
from lm_eval_dlmskip.models.llada import Block, rotary_tables
from lm_eval_dlmskip.skipping.routers import RouterConfig, Routers


def timed(fn):
    return _timed(fn, torch.device("cuda"), repeat=20, warmup=5)


def capture(fn):
    """(CUDA graph of ``fn``, its static output), after warm-up calls on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def main():
    print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
    cfg = LLaDAConfig(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288,
                      vocab_size=126464, max_sequence_length=4096, mask_token_id=126336, rope_theta=500000.0)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    with torch.device(dev):
        block = Block(cfg).to(torch.bfloat16)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    for B, L in ((1, 512), (1, 1024), (8, 1024)):
        x = torch.randn(B, L, 4096, device=dev, dtype=torch.bfloat16)
        cos, sin = rotary_tables(torch.arange(L, device=dev), 128, 500000.0)
        with torch.no_grad():
            t_eager = timed(lambda: block(x, cos, sin, None))
            mask = torch.ones(B, L, dtype=torch.bool, device=dev)
            mask[0, :17] = False
            km = mask[:, None, None, :]
            t_mask = timed(lambda: block(x, cos, sin, km))
        print(f"block B={B} L={L}: eager {t_eager:.3f} ms, with padding mask {t_mask:.3f} ms")
    # SDPA backends
    for B, L in ((1, 1024), (8, 1024)):
        q = torch.randn(B, 32, L, 128, device=dev, dtype=torch.bfloat16)
        km = torch.ones(B, 1, 1, L, dtype=torch.bool, device=dev)
        km[0, ..., :17] = False
        with torch.no_grad():
            t0 = timed(lambda: F.scaled_dot_product_attention(q, q, q))
            t1 = timed(lambda: F.scaled_dot_product_attention(q, q, q, attn_mask=km))
            add = torch.zeros(B, 1, 1, L, device=dev, dtype=torch.bfloat16).masked_fill(~km, float("-inf"))
            t2 = timed(lambda: F.scaled_dot_product_attention(q, q, q, attn_mask=add.expand(B, 32, L, L)))
        print(f"sdpa B={B} L={L}: no mask {t0:.3f} ms, bool key mask {t1:.3f} ms, additive expanded {t2:.3f} ms")
    # Router costs
    routers = Routers(RouterConfig(4096, 1, 512)).to(dev)
    B, L = 1, 1024
    h = torch.randn(B, L, 4096, device=dev, dtype=torch.bfloat16)
    masked = torch.rand(B, L, device=dev) < 0.3

    def decide():
        logits = routers(0, h)
        votes = (logits.argmax(-1) == 0).float()
        share = (votes * masked).sum(1) / masked.sum(1).clamp(min=1)
        return ~(share > 0.1)

    with torch.no_grad():
        t_router = timed(decide)
        t_router_sync = timed(lambda: decide().cpu())
        compiled = torch.compile(decide)
        t_comp = timed(compiled)
        t_comp_sync = timed(lambda: compiled().cpu())
        g, static_out = capture(decide)
        t_graph = timed(lambda: g.replay())
        host = torch.empty(1, dtype=torch.bool, pin_memory=True)

        def graph_sync():
            g.replay()
            host.copy_(static_out, non_blocking=True)
            torch.cuda.current_stream().synchronize()

        t_graph_sync = timed(graph_sync)
    print(f"router B=1 L=1024: eager {t_router:.3f} ms (+sync {t_router_sync:.3f}), compiled {t_comp:.3f} (+sync {t_comp_sync:.3f}), "
          f"graph {t_graph:.3f} (+sync {t_graph_sync:.3f})")
    # torch.cond inside CUDA graph capture
    x = torch.randn(1, 1024, 4096, device=dev, dtype=torch.bfloat16)
    cos, sin = rotary_tables(torch.arange(1024, device=dev), 128, 500000.0)
    try:
        pred = torch.tensor(True, device=dev)

        def run(x):
            return block(x, cos, sin, None)

        def keep(x):
            return x.clone()

        with torch.no_grad():
            g2, out = capture(lambda: torch.cond(pred, run, keep, (x,)))
            pred.fill_(True)
            t_true = timed(lambda: g2.replay())
            ref_true = block(x, cos, sin, None)
            ok_true = torch.equal(out, ref_true)
            pred.fill_(False)
            t_false = timed(lambda: g2.replay())
            ok_false = torch.equal(out, x)
        print(f"torch.cond in CUDA graph: works; true {t_true:.3f} ms (correct {ok_true}), false {t_false:.3f} ms (correct {ok_false})")
    except Exception as err:  # noqa: BLE001 - a probe reports whatever fails
        print("torch.cond in CUDA graph: FAILED:", type(err).__name__, str(err)[:300])
    print("has begin_capture_to_if_node:", hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node"))
    print([n for n in dir(torch.cuda.CUDAGraph) if not n.startswith("__")])


if __name__ == "__main__":
    t = time.time()
    main()
    print(f"probe took {time.time() - t:.0f}s")
