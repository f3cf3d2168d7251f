"""End to end on a GPU through the real ``lm_eval`` command: generation with CUDA graphs against
eager generation (``cuda_graphs=False``), and at batch 16 against batch 1, for plain, cached and
threshold decoding with per-row skipping and with sampling. Prints one line per comparison and
exits non-zero if any generated text differs.

The model is the tiny upstream-layout fixture (float32); the task is 24 prompts of different
lengths (so batches are left-padded) written next to the outputs. Needs lm-eval importable.

    PYTHONPATH=. python bench/gpu_cli_check.py --out /tmp/gpu_cli
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
FIXTURE = ROOT / "tests" / "fixtures" / "llada-tiny-reference"
VARIANTS = {
    "plain, random-k": "skip_random=2",
    "dual+threshold, random-k": "cache=dual,threshold=0.5,skip_random=2",
    "prefix, static": "cache=prefix,skip_layers=[1,3]",
    "dual, sampled": "cache=dual,temperature=1.0",
}


def write_task(root: Path) -> None:
    rng = random.Random(0)
    docs = [{"prompt": " ".join(f"t{rng.randrange(240)}" for _ in range(rng.randrange(4, 14))), "answer": "t1"} for _ in range(24)]
    (root / "gpu_gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "gpu_gen.yaml").write_text(
        f"task: gpu_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'gpu_gen.jsonl'}\n"
        'test_split: test\noutput_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        "generation_kwargs:\n  until: [t248]\n  max_gen_toks: 16\n  steps: 16\n  block_length: 8\n"
        "metric_list:\n  - metric: exact_match\n"
    )


def run(root: Path, name: str, model_args: str, batch_size: int) -> list[str]:
    out = root / name
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "llada_skip", "--model_args", f"pretrained={FIXTURE},dtype=float32,{model_args}",
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
    root = Path(parser.parse_args().out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    write_task(root)
    failures = 0
    for i, (variant, args) in enumerate(VARIANTS.items()):
        graphs16 = run(root, f"v{i}-graphs-b16", args, 16)
        eager16 = run(root, f"v{i}-eager-b16", f"{args},cuda_graphs=False", 16)
        graphs1 = run(root, f"v{i}-graphs-b1", args, 1)
        for what, other in (("eager, batch 16", eager16), ("graphs, batch 1", graphs1)):
            same = sum(a == b for a, b in zip(graphs16, other))
            failures += same != len(graphs16)
            print(f"{variant:<28} graphs batch 16 vs {what}: {same}/{len(graphs16)} texts equal", flush=True)
        print(f"{variant:<28} distinct answers: {len(set(graphs16))}", flush=True)
    print("ALL EQUAL" if not failures else f"{failures} comparisons differ")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
