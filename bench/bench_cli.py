"""The real ``lm_eval`` command against ``generate()`` on the same batches (issue 19 item 5).

A random-weight LLaDA-8B-shape checkpoint (bf16, upstream layout, a word-level tokenizer) and a local
GSM8K-shaped generation task (prompts of 850-950 tokens, as 5-shot GSM8K prompts are; gen 256,
blocks of 32, ``cache=dual``, one token per step) are written to ``--out``. Then, per batch size:

cli        ``python -m lm_eval --model llada_skip`` with default settings otherwise (on a GPU: compiled
           blocks and CUDA graphs); its tokens/s are the plugin's own per-task figure
           (``config.dlmskip.speed.tasks``: the wall time of the task's batches, from the first).
generate   one process that loads the same checkpoint the same way, builds the same batches (the
           prompts sorted longest first, as lm-eval's collator does, left-padded to the longest of
           each batch) and times ``generate()`` over them, from the first batch (compile and graph
           capture included, as in the CLI) and again; with ``--shapes`` also the same prompts cut to
           one length (one shape: graphs captured once) and padded to multiples of 64 tokens.

Every process starts with empty inductor and triton caches, so each pays compilation as a user's
first run does. The harness's share is 1 - cli / generate (first pass): tokenising, collation, padding, FLOPs and
speed bookkeeping, detokenising. The run prints one JSON line per measurement.

    PYTHONPATH=. python bench/bench_cli.py --out /tmp/cli --docs 16 --batch-sizes 1,8
    PYTHONPATH=. python bench/bench_cli.py --out /tmp/cli --tiny     # CPU smoke test of the script
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_llada import LLADA_8B, TINY, random_model  # noqa: E402

from lm_eval_dlmskip.decoding.generate import GenerationSettings, generate  # noqa: E402
from lm_eval_dlmskip.decoding.graphs import GraphRunner  # noqa: E402
from lm_eval_dlmskip.demo import write_checkpoint, write_tokenizer  # noqa: E402
from lm_eval_dlmskip.models.loading import load_llada  # noqa: E402

WORDS = [f"w{i}" for i in range(4000)]
SPECIALS = ["<|mdm_mask|>", "<|endoftext|>", "Question:", "Answer:"]
TASK = "gsm_shaped"


def write_model(out: Path, cfg, device: torch.device) -> Path:
    """The checkpoint folder: config.json in LLaDA's layout, random bf16 weights, the tokenizer."""
    vocab = WORDS + SPECIALS
    cfg = replace(cfg, mask_token_id=vocab.index("<|mdm_mask|>"))
    raw = {"architectures": ["LLaDAModelLM"], "model_type": "llada", "block_type": "llama", "activation_type": "silu",
           "layer_norm_type": "rms", "rope": True, "alibi": False, "weight_tying": False, "include_bias": False,
           "include_qkv_bias": False, "attention_layer_norm": False, "block_group_size": 1, "d_model": cfg.d_model,
           "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
           "mlp_hidden_size": cfg.mlp_hidden_size, "max_sequence_length": cfg.max_sequence_length,
           "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps, "torch_dtype": "bfloat16",
           "vocab_size": cfg.vocab_size, "embedding_size": cfg.vocab_size, "mask_token_id": cfg.mask_token_id,
           "eos_token_id": vocab.index("<|endoftext|>"), "pad_token_id": vocab.index("<|endoftext|>")}
    model = random_model(cfg, device)
    write_checkpoint(out, raw, model, shards=4 if cfg.n_layers > 8 else 1)
    write_tokenizer(out, vocab, cfg.max_sequence_length)
    del model
    return out


def write_task(out: Path, docs: int, lengths: tuple[int, int], seed: int = 0) -> Path:
    """A generate_until task over a local JSONL file: word prompts of GSM8K's 5-shot length."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"question": " ".join(rng.choice(WORDS) for _ in range(rng.randint(*lengths) - 2)) + " Answer:",
             "answer": " w1"} for _ in range(docs)]
    (out / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {out / 'docs.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['Question:']\nmetric_list:\n  - metric: exact_match\n")
    return out


def fresh_compile_cache(folder: Path) -> dict[str, str]:
    """Environment that gives a process empty inductor and triton caches, so that every measure pays
    compilation as a user's first run does (torch's on-disk cache would otherwise favour later ones)."""
    shutil.rmtree(folder, ignore_errors=True)
    return {"TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor"), "TRITON_CACHE_DIR": str(folder / "triton")}


def run_cli(model: Path, tasks: Path, out: Path, batch: int, args: str, device: str) -> dict:
    cmd = [sys.executable, "-m", "lm_eval", "--model", "llada_skip", "--model_args", f"pretrained={model},{args}",
           "--tasks", TASK, "--include_path", str(tasks), "--device", device, "--batch_size", str(batch),
           "--output_path", str(out)]
    tic = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                                       **fresh_compile_cache(out.parent / f"{out.name}-caches")})
    wall = time.perf_counter() - tic
    (out.parent / f"{out.name}.log").write_text(done.stdout + done.stderr)
    if done.returncode:
        raise RuntimeError(f"lm_eval failed ({done.returncode}):\n{done.stderr[-3000:]}")
    [results] = sorted(out.rglob("results_*.json"))
    speed = json.loads(results.read_text())["config"]["dlmskip"]["speed"]
    task = speed["tasks"][TASK]
    return {"measure": "cli", "B": batch, "tokens_per_s": round(task["tokens_per_s"], 1),
            "batches_seconds": round(task["wall_seconds"], 2), "process_seconds": round(wall, 1),
            "requests": round(task["requests_per_s"] * task["wall_seconds"]), "compile": speed.get("compile")}


@torch.no_grad()
def run_generate(model_dir: Path, tasks: Path, batch_sizes: list[int], settings: GenerationSettings,
                 device: torch.device, compile: bool, shapes: bool) -> None:
    """generate() on the batches lm-eval would form, timed cold (first pass) and again, and with
    ``shapes`` on one shape and on lengths bucketed by 64; one JSON line each."""
    from transformers import AutoTokenizer

    loaded = load_llada(str(model_dir), dtype="bfloat16", device=device)
    model = loaded.model
    if compile:
        model.compile_blocks()
    forward = GraphRunner(model) if device.type == "cuda" else model
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompts = [tok(json.loads(line)["question"], add_special_tokens=False)["input_ids"]
               for line in (tasks / "docs.jsonl").read_text().splitlines()]
    prompts.sort(key=len, reverse=True)
    median = len(prompts[len(prompts) // 2])

    def batches(lengths: str, batch: int) -> list:
        """lm-eval's batches (``as is``), or every prompt cut to one length (``one shape``), or each
        batch left-padded to a multiple of 64 tokens (``bucketed``)."""
        out = []
        for i in range(0, len(prompts), batch):
            chunk = [p[-median:] if lengths == "one shape" else p for p in prompts[i : i + batch]]
            P = len(chunk[0]) if lengths != "bucketed" else -(-len(chunk[0]) // 64) * 64
            ids = torch.tensor([[tok.pad_token_id] * (P - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in chunk], device=device)
            out.append((ids, None if bool(mask.all()) else mask))
        return out

    def denoise(ids, attention_mask, logits_at, cache=None, window=None):
        return forward(ids, attention_mask, logits_at=logits_at, cache=cache, window=window)[0]

    for batch in batch_sizes:
        measures = [("generate, first pass", "as is"), ("generate, again", "as is")]
        if shapes:
            measures += [("generate, one shape", "one shape"), ("generate, bucketed by 64", "bucketed")]
        for name, lengths in measures:
            if device.type == "cuda":
                torch.cuda.synchronize()
            tic = time.perf_counter()
            for ids, mask in batches(lengths, batch):
                generate(denoise, ids, mask, settings, model.cfg.mask_token_id)[:, -settings.gen_length :].tolist()
            seconds = time.perf_counter() - tic
            print(json.dumps({"measure": name, "B": batch, "seconds": round(seconds, 2),
                              "tokens_per_s": round(len(prompts) * settings.gen_length / seconds, 1)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks the script runs")
    ap.add_argument("--skip", default="", help="measures to leave out: cli, generate")
    ap.add_argument("--shapes", action="store_true", help="also time generate() on one shape and on lengths bucketed by 64")
    a = ap.parse_args()
    device = torch.device("cpu" if a.tiny else "cuda")
    cfg = replace(TINY, max_sequence_length=1400, vocab_size=len(WORDS) + len(SPECIALS)) if a.tiny else LLADA_8B
    settings = GenerationSettings(64, 64, 32, cache="dual") if a.tiny else GenerationSettings(256, 256, 32, cache="dual")
    model_dir = a.out / "model"
    if not (model_dir / "config.json").exists():
        tic = time.perf_counter()
        write_model(model_dir, cfg, device)
        print(json.dumps({"measure": "wrote checkpoint", "seconds": round(time.perf_counter() - tic, 1)}), flush=True)
    lengths = (40, 60) if a.tiny else (850, 950)
    tasks = write_task(a.out / "tasks", a.docs, lengths)
    args = f"cache=dual,gen_length={settings.gen_length},block_length={settings.block_length},steps={settings.steps}"
    batch_sizes = [int(b) for b in a.batch_sizes.split(",")]
    if "generate" not in a.skip:
        os.environ.update(fresh_compile_cache(a.out / "generate-caches"))
        run_generate(model_dir, tasks, batch_sizes, settings, device, compile=device.type == "cuda", shapes=a.shapes)
    for batch in batch_sizes if "cli" not in a.skip else []:
        print(json.dumps(run_cli(model_dir, tasks, a.out / f"cli_b{batch}", batch, args, device.type)), flush=True)
    print(json.dumps({"measure": "settings", **asdict(settings), "docs": a.docs, "prompt_tokens": lengths,
                      "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
