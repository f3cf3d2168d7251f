"""Markdown tables from a bench_llada.py results file (used to write bench/RESULTS.md).

    python bench/summarize.py bench/runs/2026-11-23-h100-run4.json
"""

from __future__ import annotations

import json
import sys


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def gib(row: dict) -> str:
    return f"{row['peak_gib']:.2f}" if row.get("peak_gib") is not None else ""


def main(path: str) -> None:
    r = json.loads(open(path).read())
    print(f"Device: {r['device']}, torch {r['torch']}, measured bf16 matmul {r['matmul_tflops']:.0f} TFLOP/s, {r['date']}.\n")
    print("| block | ours eager (ms) | ours compiled (ms) | upstream (ms) |\n|---|---|---|---|")
    for b in r["block"]:
        print(f"| B={b['B']} L={b['L']} | {b['ours_ms']:.3f} | {b['ours_compiled_ms']:.3f} | {b['upstream_ms']:.3f} |")
    print("\n| forward | engine | method | ms | time ratio | FLOPs ratio papers | FLOPs ratio whole model | "
          "share of matmul rate | routing overhead per block | peak GiB |\n|---|---|---|---|---|---|---|---|---|---|")
    for f in r["forward"]:
        if f["method"] == "upstream":
            print(f"| B={f['B']} L={f['L']} | upstream | - | {f['ms']:.2f} | | | | {pct(f['matmul_fraction'])} | | {gib(f)} |")
            continue
        over = (f"{f['routing_overhead_us_per_block']:.0f} us ({f['routing_overhead_pct_of_block']:.1f}%)"
                if "routing_overhead_us_per_block" in f else "")
        print(f"| B={f['B']} L={f['L']} | {f['engine']} | {f['method']} k={f['k']} | {f['ms']:.2f} | {f['time_ratio']:.4f} | "
              f"{f['flops_ratio_papers']:.4f} | {f['flops_ratio_whole_model']:.4f} | {pct(f['matmul_fraction'])} | {over} | {gib(f)} |")
    lk = r["likelihood"]
    print(f"\n| likelihood (mc_num {lk['mc_num']}, {lk['requests']} requests) | requests/s | peak GiB | vs upstream |\n|---|---|---|---|")
    for name in ("eager", "compiled"):
        print(f"| ours {name} ({lk['batch_requests']} requests per batch) | {lk[f'{name}_req_per_s']:.3f} | "
              f"{lk[f'{name}_peak_gib']:.2f} | x{lk[f'{name}_speedup']:.2f} |")
    print(f"| upstream get_log_likelihood (mini-batch 16) | {lk['upstream_req_per_s']:.3f} | {lk['upstream_peak_gib']:.2f} | |")
    print("\n| generate (prompt 512, 256 tokens, 256 steps) | eager tok/s | fast tok/s | upstream tok/s | "
          "fast ms/step | peak GiB fast / upstream | vs upstream (eager / fast) |\n|---|---|---|---|---|---|---|")
    for g in r["generation"]:
        print(f"| B={g['B']} block {g['block_length']} | {g['eager_tokens_per_s']:.1f} | {g['fast_tokens_per_s']:.1f} | "
              f"{g['upstream_tokens_per_s']:.1f} | {g['fast_step_ms']:.1f} | {g['fast_peak_gib']:.2f} / {g['upstream_peak_gib']:.2f} | "
              f"x{g['eager_speedup']:.2f} / x{g['fast_speedup']:.2f} |")
    print("\nChecks: " + ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in r["checks"].items()))


if __name__ == "__main__":
    main(sys.argv[1])
