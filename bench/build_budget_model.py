"""A small LLaDA trained on four synthetic tasks of different redundancy, for router-budget work
(issue 20 item 6): reverse and sort a list of 4 words, compare two 2-digit numbers, add two 2-digit
numbers. Writes the checkpoint in the upstream layout (as ``dlmskip demo`` does), a generation task
per skill with a test split (100 documents) and a training split (500), all offline.

    python bench/build_budget_model.py --out /tmp/budget-model            # 1500 steps of 32 examples: ~25 min on 2 busy CPU cores
    python bench/build_budget_model.py --out /tmp/budget-model --device cuda

Then ``lm_eval --model llada_skip --model_args pretrained=OUT/model --include_path OUT/tasks --tasks
budget_reverse,budget_sort,budget_compare,budget_add``. The numbers it reaches are in
docs/routers-budget/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lm_eval_dlmskip.demo import METRIC_KEYS, write_checkpoint, write_tokenizer
from lm_eval_dlmskip.models.config import LLaDAConfig
from lm_eval_dlmskip.models.llada import LLaDA

WORDS = [f"w{i}" for i in range(16)]
DIGITS = [f"n{i}" for i in range(10)]
MARKS = ["reverse", "sort", "compare", "add", ":", ".", "<", ">", "=", "+"]
SPECIALS = ["<|mdm_mask|>", "<|endoftext|>", "<|startoftext|>", "<|eot_id|>"]
VOCAB = WORDS + DIGITS + MARKS + SPECIALS


def reverse(rng: random.Random) -> tuple[str, str]:
    items = [rng.choice(WORDS) for _ in range(4)]
    return " ".join(items) + " reverse :", " " + " ".join(reversed(items)) + " ."


def sort(rng: random.Random) -> tuple[str, str]:
    items = [rng.randrange(10) for _ in range(4)]
    return " ".join(DIGITS[i] for i in items) + " sort :", " " + " ".join(DIGITS[i] for i in sorted(items)) + " ."


def compare(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(10, 100), 2)
    sign = "<" if a < b else ">"
    return f"{_number(a)} compare {_number(b)} :", f" {sign} ."


def add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(10, 100), rng.randrange(10, 100)
    return f"{_number(a)} + {_number(b)} =", f" {_number(a + b, 3)} ."


def _number(value: int, width: int = 2) -> str:
    return " ".join(DIGITS[int(c)] for c in str(value).zfill(width))


TASKS = {"reverse": reverse, "sort": sort, "compare": compare, "add": add}
CONFIG = {
    "architectures": ["LLaDAModelLM"], "model_type": "llada", "block_type": "llama", "activation_type": "silu",
    "layer_norm_type": "rms", "rope": True, "alibi": False, "weight_tying": False, "include_bias": False,
    "include_qkv_bias": False, "attention_layer_norm": False, "block_group_size": 1, "d_model": 128, "n_layers": 8,
    "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 384, "max_sequence_length": 64, "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5, "torch_dtype": "float32",
}


def train_model(cfg: LLaDAConfig, steps: int, device: str, batch: int = 64, seed: int = 0, log_every: int = 100) -> LLaDA:
    """LLaDA's SFT objective on the four tasks, one task per step in turn (its rows all have one
    length, so no row is padded, as no prompt is at evaluation: a model trained on rows padded to
    the batch's longest learned to answer a short task only with padding after its answer), a
    random share of the answer masked, CE / p_mask."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    index = {w: i for i, w in enumerate(VOCAB)}
    model = LLaDA(cfg).to(device)
    for p in model.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    pad, mask = index["<|endoftext|>"], cfg.mask_token_id
    tic = time.time()
    for step in range(steps):
        rows, prompt_lens = [], []
        make = TASKS[list(TASKS)[step % len(TASKS)]]
        for _ in range(batch):
            prompt, answer = make(rng)
            p, a = [index[w] for w in prompt.split()], [index[w] for w in answer.split()]
            rows.append(p + a)
            prompt_lens.append(len(p))
        L = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (L - len(r)) for r in rows], device=device)
        position = torch.arange(L, device=device)[None, :]
        answer = (position >= torch.tensor(prompt_lens, device=device)[:, None]) & (
            position < torch.tensor([len(r) for r in rows], device=device)[:, None])
        p_mask = torch.rand(len(rows), 1, device=device).clamp(min=0.05)
        masked = answer & (torch.rand(ids.shape, device=device) < p_mask)
        logits, _ = model(torch.where(masked, mask, ids))
        loss = (F.cross_entropy(logits[masked], ids[masked], reduction="none") / p_mask.expand_as(ids)[masked]).sum() / answer.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - tic:.0f} s)", flush=True)
    return model.cpu().eval()


def write_tasks(out: Path, n_test: int = 100, n_train: int = 500, seed: int = 1) -> Path:
    """A generation task per skill (greedy, one step per answer token, one block), with a training split."""
    rng = random.Random(seed)
    tasks = out.resolve() / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    for name, make in TASKS.items():
        files = {}
        for split, count in (("test", n_test), ("train", n_train)):
            docs = [make(rng) for _ in range(count)]
            files[split] = tasks / f"{name}_{split}.jsonl"
            files[split].write_text("".join(json.dumps({"prompt": p, "answer": a.strip(" .")}) + "\n" for p, a in docs))
        length = len(make(rng)[1].split())
        (tasks / f"budget_{name}.yaml").write_text(
            f"task: budget_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {files['test']}\n"
            f"    train: {files['train']}\ntest_split: test\ntraining_split: train\ndoc_to_text: \"{{{{prompt}}}}\"\n"
            "output_type: generate_until\ndoc_to_target: \"{{answer}}\"\n"
            f"generation_kwargs:\n  until: [\".\"]\n  max_gen_toks: {length}\n  steps: {length}\n  block_length: {length}\n"
            "filter_list:\n  - name: strip\n    filter:\n      - function: regex\n        regex_pattern: \"^\\\\s*(.*?)\\\\s*$\"\n"
            "      - function: take_first\nmetric_list:\n  - metric: exact_match\n" + METRIC_KEYS
            + "    ignore_punctuation: true\n")
    return tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=64, help="examples per step")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-layers", type=int, default=CONFIG["n_layers"])
    parser.add_argument("--d-model", type=int, default=CONFIG["d_model"])
    args = parser.parse_args()
    out = Path(args.out)
    raw = {**CONFIG, "n_layers": args.n_layers, "d_model": args.d_model, "mlp_hidden_size": 3 * args.d_model,
           "vocab_size": len(VOCAB), "embedding_size": len(VOCAB), "mask_token_id": VOCAB.index("<|mdm_mask|>"),
           "eos_token_id": VOCAB.index("<|endoftext|>"), "pad_token_id": VOCAB.index("<|endoftext|>")}
    checkpoint = out / "model"
    if not (checkpoint / "model.safetensors.index.json").exists():
        model = train_model(LLaDAConfig.from_dict(raw), args.steps, args.device, args.batch)
        tmp = out / "model.tmp"
        write_checkpoint(tmp, raw, model)
        write_tokenizer(tmp, VOCAB, raw["max_sequence_length"])
        os.replace(tmp, checkpoint)
    print(f"checkpoint {checkpoint}\ntasks {write_tasks(out)}")


if __name__ == "__main__":
    main()
