"""End to end on a GPU through the real ``lm_eval`` command: generation with CUDA graphs against
eager generation (``cuda_graphs=False``), and at batch 16 against batch 1, for plain, cached and
threshold decoding with per-row skipping and with sampling (``--model llada_skip``), or for Dream's
unmasking algorithms with static, per-row random and no skipping and with sampling
(``--model dream_skip``). Prints one line per comparison and exits non-zero if any generated text
differs.

The model is the family's tiny upstream-layout fixture (float32); the task is 24 prompts of
different lengths (so batches are left-padded) written next to the outputs. Needs lm-eval importable.

    PYTHONPATH=. python bench/gpu_cli_check.py --model dream_skip --out /tmp/gpu_cli
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = {"llada_skip": ROOT / "tests" / "fixtures" / "llada-tiny-reference",
            "dream_skip": ROOT / "tests" / "fixtures" / "dream-reference"}
VARIANTS = {
    "llada_skip": {
        "plain, random-k": "skip_random=2",
        "dual+threshold, random-k": "cache=dual,threshold=0.5,skip_random=2",
        "prefix, static": "cache=prefix,skip_layers=[1,3]",
        "dual, sampled": "cache=dual,temperature=1.0",
    },
    "dream_skip": {
        "entropy, random-k": "alg=entropy,skip_random=1",
        "maskgit_plus, static": "alg=maskgit_plus,skip_layers=[1]",
        "topk_margin, top_p": "alg=topk_margin,top_p=0.9",
        "entropy, sampled": "alg=entropy,temperature=1.0",
    },
}
DECODING = {"llada_skip": "  steps: 16\n  block_length: 8\n", "dream_skip": "  steps: 8\n"}
WORDS = {"llada_skip": 240, "dream_skip": 120}  # the fixture tokenizers' plain words t0..t{n-1}


def write_task(root: Path, model: str) -> None:
    rng = random.Random(0)
    words = WORDS[model]
    docs = [{"prompt": " ".join(f"t{rng.randrange(words)}" for _ in range(rng.randrange(4, 14))), "answer": "t1"}
            for _ in range(24)]
    (root / "gpu_gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "gpu_gen.yaml").write_text(
        f"task: gpu_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'gpu_gen.jsonl'}\n"
        'test_split: test\noutput_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        f"generation_kwargs:\n  until: [t{words + 1}]\n  max_gen_toks: 16\n{DECODING[model]}"
        "metric_list:\n  - metric: exact_match\n"
    )


def run(root: Path, model: str, name: str, model_args: str, batch_size: int) -> list[str]:
    out = root / name
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", f"pretrained={FIXTURES[model]},dtype=float32,{model_args}",
         "--tasks", "gpu_gen", "--include_path", str(root), "--device", "cuda", "--batch_size", str(batch_size),
         "--output_path", str(out), "--log_samples"],
        capture_output=True, text=True, env=env,
    )
    (root / f"{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode:
        raise SystemExit(f"{name}: lm_eval failed\n{done.stderr[-3000:]}")
    [samples] = list(out.rglob("samples_gpu_gen_*.jsonl"))
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    return [r["resps"][0][0] for r in sorted(rows, key=lambda r: r["doc_id"])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_cli_check")
    parser.add_argument("--model", choices=sorted(FIXTURES), default="llada_skip")
    args = parser.parse_args()
    root, model = Path(args.out).resolve(), args.model
    root.mkdir(parents=True, exist_ok=True)
    write_task(root, model)
    failures = 0
    for i, (variant, model_args) in enumerate(VARIANTS[model].items()):
        graphs16 = run(root, model, f"v{i}-graphs-b16", model_args, 16)
        eager16 = run(root, model, f"v{i}-eager-b16", f"{model_args},cuda_graphs=False", 16)
        graphs1 = run(root, model, f"v{i}-graphs-b1", model_args, 1)
        for what, other in (("eager, batch 16", eager16), ("graphs, batch 1", graphs1)):
            same = sum(a == b for a, b in zip(graphs16, other))
            failures += same != len(graphs16)
            print(f"{variant:<28} graphs batch 16 vs {what}: {same}/{len(graphs16)} texts equal", flush=True)
        print(f"{variant:<28} distinct answers: {len(set(graphs16))}", flush=True)
    print("ALL EQUAL" if not failures else f"{failures} comparisons differ")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
