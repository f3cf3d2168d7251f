"""Achieved weight-read bandwidth of every LLaDA-8B projection at decoding's shapes (issue 19 item 3).

A cached decoding step multiplies M = 32 x batch rows by each weight once, so a GEMM's time is
its weight read: bandwidth = weight bytes / time. Each projection is timed as the model calls it
(``F.linear``, cuBLAS), and against the layouts and kernels that could do better: the projections
that read the same input fused into one weight (q|k|v, gate|up), the weight stored transposed
(``x @ W``), and Triton GEMMs autotuned by ``torch.compile(mode="max-autotune-no-cudagraphs")``.
Each call reads another copy of the weight (1 GiB of copies), so none is served from the L2 cache.
Every kernel is replayed from a CUDA graph of ``--repeat`` calls, so launch gaps do not count. The
reference peak is a read-only sum over 2 GiB, larger than the L2 cache (a GEMM at decoding's shapes
reads its weight and writes almost nothing).

    python bench/bench_gemm.py --batch-sizes 1,8 --out gemm.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

D, FF, VOCAB, HEADS_KV = 4096, 12288, 126464, 4096  # LLaDA-8B: d_model, MLP hidden, vocabulary, k/v width


def projections() -> dict[str, tuple[int, int]]:
    """(out, in) of each weight a block (and the head) reads once per forward."""
    return {"q_proj": (D, D), "k_proj": (HEADS_KV, D), "v_proj": (HEADS_KV, D), "attn_out": (D, D),
            "ff_proj": (FF, D), "up_proj": (FF, D), "ff_out": (D, FF), "qkv fused": (D + 2 * HEADS_KV, D),
            "gate|up fused": (2 * FF, D), "lm head": (VOCAB, D)}


def graph_time(fn: Callable[[], object], repeat: int, rounds: int = 5) -> float:
    """Seconds per call of ``fn``: ``repeat`` calls captured in one CUDA graph, best of ``rounds``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            fn()
    best = float("inf")
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / repeat)
    return best


def read_bandwidth(gib: float = 2.0) -> float:
    """Bytes/s of a read-only sum over ``gib`` GiB: the achievable read peak."""
    x = torch.ones(int(gib * 2**30) // 2, dtype=torch.bfloat16, device="cuda")
    total = torch.empty((), dtype=torch.float32, device="cuda")
    seconds = graph_time(lambda: torch.sum(x, dim=0, dtype=torch.float32, out=total), 4)
    return x.numel() * x.element_size() / seconds


def kernels(rows: int, out: int, inp: int, autotune: bool, spread_mib: int) -> dict[str, Callable[[], object]]:
    """Each kernel over copies of the weight taken in turn, ``spread_mib`` MiB of them at least, so
    no call finds its weight in the L2 cache (50 MiB): in the model each weight is read once a
    forward, after every other block's."""
    x = torch.randn(rows, inp, dtype=torch.bfloat16, device="cuda")
    copies = max(2, -(-spread_mib * 2**20 // (out * inp * 2)))
    ws = [torch.randn(out, inp, dtype=torch.bfloat16, device="cuda") / inp**0.5 for _ in range(copies)]
    wts = [w.t().contiguous() for w in ws]
    turn = iter(range(10**9))

    def cycling(fn: Callable[[torch.Tensor, torch.Tensor], object], weights: list[torch.Tensor]) -> Callable[[], object]:
        return lambda: fn(x, weights[next(turn) % len(weights)])

    found = {"F.linear (cuBLAS, model layout)": cycling(F.linear, ws), "x @ W^T stored (cuBLAS)": cycling(torch.matmul, wts)}
    if autotune:
        tuned = torch.compile(lambda a, b: F.linear(a, b), mode="max-autotune-no-cudagraphs", dynamic=False)
        found["Triton, max-autotune"] = cycling(tuned, ws)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="1,8", help="decoding batch sizes: M = 32 x B rows")
    parser.add_argument("--repeat", type=int, default=50, help="calls per captured graph")
    parser.add_argument("--no-autotune", action="store_true", help="skip the Triton max-autotune kernels (slow to tune)")
    parser.add_argument("--spread-mib", type=int, default=1024, help="MiB of weight copies each kernel cycles through")
    parser.add_argument("--out", help="JSON file for the figures")
    args = parser.parse_args()
    peak = read_bandwidth()
    rows_out = []
    print(f"{torch.cuda.get_device_name()}: read-only sum {peak / 1e12:.2f} TB/s (the reference peak)")
    print(f"{'B':>2} {'M':>4} {'projection':<14} {'kernel':<34} {'us':>8} {'TB/s':>6} {'of peak':>7}")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        rows = 32 * batch
        for name, (out, inp) in projections().items():
            for kernel, fn in kernels(rows, out, inp, not args.no_autotune, args.spread_mib).items():
                tic = time.time()
                seconds = graph_time(fn, args.repeat)
                bandwidth = out * inp * 2 / seconds
                row = {"batch": batch, "rows": rows, "projection": name, "kernel": kernel, "us": seconds * 1e6,
                       "tb_per_s": bandwidth / 1e12, "of_peak": bandwidth / peak, "setup_s": time.time() - tic}
                rows_out.append(row)
                print(f"{batch:>2} {rows:>4} {name:<14} {kernel:<34} {row['us']:>8.1f} {row['tb_per_s']:>6.2f} {row['of_peak']:>7.1%}",
                      flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "peak_read_tb_per_s": peak / 1e12,
                       "rows": rows_out}, f, indent=1)


if __name__ == "__main__":
    main()
