"""Share of blocks routers execute, by how many answer tokens are still masked (docs/routers-budget/mask-ratio.md).

For each test document of a task (prompt + " answer ."), and each count k of masked answer tokens
(k random positions, 8 draws), the routers' decisions as lm_eval makes them (RoutedSkip, the
model's dtype): the mean executed share per k, and the masked-token accuracy of the argmax
prediction. Shows whether a router uses the denoising state (a ratio-aware one should run fewer
blocks at small k).

    python bench/routed_by_mask_ratio.py --model M/model --tasks-dir M/tasks --task sort ROUTER [ROUTER ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lm_eval_dlmskip.models.loading import load_llada, load_tokenizer
from lm_eval_dlmskip.skipping.router_checkpoints import load_routers
from lm_eval_dlmskip.skipping.routers import RoutedSkip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tasks-dir", required=True)
    parser.add_argument("--task", required=True, help="jsonl prefix: sort, reverse, ...")
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("routers", nargs="+")
    args = parser.parse_args()
    checkpoint = load_llada(args.model, dtype="float32")
    model, cfg = checkpoint.model, checkpoint.model.cfg
    tokenizer = load_tokenizer(checkpoint.path, cfg.mask_token_id)
    docs = [json.loads(line) for line in (Path(args.tasks_dir) / f"{args.task}_test.jsonl").read_text().splitlines()]
    rows = [(tokenizer(d["prompt"])["input_ids"], tokenizer(" " + d["answer"] + " .")["input_ids"]) for d in docs]
    P, T = len(rows[0][0]), len(rows[0][1])
    assert all(len(p) == P and len(a) == T for p, a in rows), "documents of one length only"
    ids = torch.tensor([p + a for p, a in rows])
    for router in args.routers:
        routers = load_routers(router, cfg, checkpoint.fingerprint).routers
        policy = RoutedSkip(routers, routers.cfg.tau)
        generator = torch.Generator().manual_seed(0)
        line = []
        for k in range(1, T + 1):
            executed, correct, total = 0.0, 0, 0
            for _ in range(args.draws):
                chosen = torch.rand(len(ids), T, generator=generator).argsort(1) < k
                masked = torch.zeros_like(ids, dtype=torch.bool)
                masked[:, P:] = chosen
                with torch.no_grad():
                    logits, trace = model(torch.where(masked, cfg.mask_token_id, ids), policy=policy)
                executed += trace.executed.float().mean().item()
                correct += (logits.argmax(-1)[masked] == ids[masked]).sum().item()
                total += masked.sum().item()
            line.append(f"k={k} (r={k / (P + T):.2f}): exec {executed / args.draws:.3f} acc {correct / total:.3f}")
        print(f"{router} (mask_ratio={routers.cfg.mask_ratio}):\n  " + "\n  ".join(line))


if __name__ == "__main__":
    main()
