"""GPU probe: can a routed block be skipped without a host round trip?

Today a routed block costs one device-to-host read (the host must know the decision before it
launches the block). This probe tries the other way: the GPU decides by itself. The block's matrix
products run as grouped GEMMs whose row count is a device tensor (``torch._grouped_mm`` offsets) and
attention as varlen attention with device-side sequence offsets; a skip sets the row count to 0 and
the residual keeps the input. Everything, routers included, is captured into one CUDA graph.

Prints, at batch 1 (LLaDA-8B block shape, random bf16 weights): one block plain / gated-executed /
gated-skipped, and 32-block forwards in one graph: plain, routed with every block executed, routed
with every block skipped. Usage: PYTHONPATH=.:bench python bench/probe_device_gate.py [--seq 1024] [--compile]
"""

import argparse

import torch
import torch.nn.functional as F
from bench_llada import timed as _timed
from probe import capture
from torch.nn.attention.varlen import varlen_attn

from lm_eval_dlmskip.common.norms import rms_norm
from lm_eval_dlmskip.models.llada import apply_rotary, rotary_tables

D, H, HD, MLP, EPS, THETA = 4096, 32, 128, 12288, 1e-5, 500000.0


def timed(fn):
    return _timed(fn, torch.device("cuda"), repeat=30, warmup=5)


def make_weights(dev):
    def w(*shape):
        return torch.randn(*shape, device=dev, dtype=torch.bfloat16) * 0.02

    return {"attn_norm": torch.ones(D, device=dev, dtype=torch.bfloat16), "qkv": w(3 * D, D), "out": w(D, D),
            "mlp_norm": torch.ones(D, device=dev, dtype=torch.bfloat16), "gate_up": w(2 * MLP, D), "down": w(D, MLP),
            "r1": w(512, D), "r_norm": torch.ones(512, device=dev, dtype=torch.bfloat16), "r2": w(2, 512),
            "r2_bias": torch.zeros(2, device=dev, dtype=torch.bfloat16)}


def plain_block(x, W, cos, sin):
    """Reference: one LLaDA block on (L, D) rows with cuBLAS products and SDPA."""
    L = x.shape[0]
    q, k, v = F.linear(rms_norm(x, W["attn_norm"], EPS), W["qkv"]).view(L, 3, H, HD).unbind(1)
    q, k = (apply_rotary(t.transpose(0, 1)[None], cos, sin, True) for t in (q, k))
    a = F.scaled_dot_product_attention(q, k, v.transpose(0, 1)[None])[0].transpose(0, 1).reshape(L, D)
    x = x + F.linear(a, W["out"])
    gate, up = F.linear(rms_norm(x, W["mlp_norm"], EPS), W["gate_up"]).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, W["down"])


def gmm(x, w, rows):
    """x @ w.T over the first ``rows`` rows only (a device tensor); the other rows are left undefined."""
    return torch._grouped_mm(x, w.t().unsqueeze(0), offs=rows)


def gated_block(x, W, cos, sin, rows, cu_seq, run):
    """The same block, doing (almost) no work when the device flag ``run`` is False."""
    L = x.shape[0]
    q, k, v = gmm(rms_norm(x, W["attn_norm"], EPS), W["qkv"], rows).view(L, 3, H, HD).unbind(1)
    q, k = (apply_rotary(t.transpose(0, 1), cos, sin, True).transpose(0, 1) for t in (q, k))
    a = varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu_seq, cu_seq, L, L).reshape(L, D)
    h = x + gmm(a, W["out"], rows)
    gate, up = gmm(rms_norm(h, W["mlp_norm"], EPS), W["gate_up"], rows).chunk(2, dim=-1)
    h = h + gmm(F.silu(gate) * up, W["down"], rows)
    return torch.where(run, h, x)


def route(x, W, masked, tau=0.1):
    """D-LLM-style router over all rows, vote over masked rows: True = execute the block."""
    logits = F.linear(F.silu(rms_norm(F.linear(x, W["r1"]), W["r_norm"], EPS)), W["r2"], W["r2_bias"])
    skip_votes = (logits[:, 0] > logits[:, 1]).float()
    share = (skip_votes * masked).sum() / masked.sum().clamp(min=1)
    return share <= tau


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--compile", action="store_true", help="torch.compile both block functions")
    args = parser.parse_args()
    L, n_blocks = args.seq, args.blocks
    global plain_block, gated_block
    if args.compile:
        plain_block, gated_block = torch.compile(plain_block), torch.compile(gated_block)
    dev = torch.device("cuda")
    print("torch", torch.__version__, torch.cuda.get_device_name(), f"B=1 L={L}", "compiled" if args.compile else "eager")
    torch.manual_seed(0)
    weights = [make_weights(dev) for _ in range(n_blocks)]
    cos, sin = rotary_tables(torch.arange(L, device=dev), HD, THETA)
    x = torch.randn(L, D, device=dev, dtype=torch.bfloat16)
    masked = (torch.rand(L, device=dev) < 0.3).float()
    rows = torch.full((1,), L, device=dev, dtype=torch.int32)
    cu_seq = torch.tensor([0, L], device=dev, dtype=torch.int32)
    run = torch.ones((), device=dev, dtype=torch.bool)
    W = weights[0]

    def set_flag(execute: bool):
        run.fill_(execute)
        rows.fill_(L if execute else 0)
        cu_seq[1] = L if execute else 0

    with torch.no_grad():
        ref = plain_block(x, W, cos, sin)
        got = gated_block(x, W, cos, sin, rows, cu_seq, run)
        print("gated block equals plain block: max abs diff", (got.float() - ref.float()).abs().max().item(),
              "of max", ref.float().abs().max().item())
        set_flag(False)
        print("gated block skipped returns its input:", torch.equal(gated_block(x, W, cos, sin, rows, cu_seq, run), x))
        g_plain, _ = capture(lambda: plain_block(x, W, cos, sin))
        set_flag(True)
        g_gated, _ = capture(lambda: gated_block(x, W, cos, sin, rows, cu_seq, run))
        t_plain = timed(g_plain.replay)
        t_exec = timed(g_gated.replay)
        set_flag(False)
        t_skip = timed(g_gated.replay)
        print(f"one block in a graph: plain {t_plain:.3f} ms, gated executed {t_exec:.3f} ms, gated skipped {t_skip:.3f} ms")

        def forward_plain():
            h = x
            for Wb in weights:
                h = plain_block(h, Wb, cos, sin)
            return h

        def forward_routed():
            h = x
            for Wb in weights:
                go = route(h, Wb, masked)
                run.copy_(go)
                rows.copy_(go.int() * L)
                cu_seq[1:].copy_(rows)
                h = gated_block(h, Wb, cos, sin, rows, cu_seq, run)
            return h

        g_fp, _ = capture(forward_plain)
        t_fp = timed(g_fp.replay)
        for Wb in weights:  # force every vote through the bias: execute everywhere
            Wb["r2_bias"].copy_(torch.tensor([-100.0, 100.0]))
        g_fr, out_r = capture(forward_routed)
        t_all = timed(g_fr.replay)
        agree = torch.equal(out_r, forward_routed())
        for Wb in weights:  # then skip everywhere
            Wb["r2_bias"].copy_(torch.tensor([100.0, -100.0]))
        t_none = timed(g_fr.replay)
        print(f"{n_blocks}-block forward in one graph: plain {t_fp:.2f} ms; routed, all executed {t_all:.2f} ms "
              f"(routing overhead {(t_all - t_fp) / n_blocks * 1e3:.1f} us/block, "
              f"{(t_all - t_fp) / t_fp * 100:.1f}%); routed, all skipped {t_none:.2f} ms; replay == eager {agree}")


if __name__ == "__main__":
    main()
