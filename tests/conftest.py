"""Shared fixtures: the upstream golden data (copied into tests/fixtures) and tiny checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lm_eval_dlmskip.models.execution import KVCache
from lm_eval_dlmskip.models.loading import load_llada

REFERENCE = Path(__file__).parent / "fixtures" / "llada-tiny-reference"
MASK_ID, EOS_ID = 250, 251

# One CPU thread, here and in the lm_eval processes the tests start, unless OMP_NUM_THREADS says
# otherwise: the models are tiny, and on a small CPU shared with other work each operation of a
# second thread waits for a busy core (the demo model trained 10 times slower with 2 threads than 1).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def nan_kv_cache(monkeypatch):
    """Every cache fill starts from keys and values that are all NaN, so a read of a slot that this
    fill never wrote (the K/V of a block a row skipped, padding, an earlier fill's block) makes the
    answer NaN instead of passing on what an earlier fill or the allocator left there. ``allocate``
    runs on the eager cache and on the GraphRunner's lent storage alike (its fill calls it too)."""
    allocate = KVCache.allocate

    def poisoned(self, *args, **kwargs) -> None:
        allocate(self, *args, **kwargs)
        for storage in (*self.k, *self.v):  # one tensor over the blocks, or one per block (a split model)
            storage.fill_(float("nan"))

    monkeypatch.setattr(KVCache, "allocate", poisoned)


@pytest.fixture(scope="session")
def ref_dir() -> Path:
    return REFERENCE


@pytest.fixture(scope="session")
def ref() -> dict:
    return json.loads((REFERENCE / "reference.json").read_text())


@pytest.fixture(scope="session")
def ref_tensors() -> dict[str, torch.Tensor]:
    return load_file(str(REFERENCE / "reference.safetensors"))


@pytest.fixture(scope="session")
def ref_model():
    return load_llada(str(REFERENCE), dtype="float32").model


def model_denoiser(model, policy=None):
    """A denoise(ids, attention_mask, logits_at) over a model, as the harness builds one."""
    from lm_eval_dlmskip.skipping.policies import NO_SKIP

    def denoise(ids, attention_mask, logits_at):
        return model(ids, attention_mask, policy=policy or NO_SKIP, logits_at=logits_at)[0]

    return denoise


def greedy_answer(denoise, prompt: list[int], length: int) -> list[int]:
    """The answer upstream's greedy check accepts, by its definition: from a fully masked answer,
    unmask the single most confident position at a time."""
    ids = torch.tensor([prompt + [MASK_ID] * length])
    for _ in range(length):
        probs = denoise(ids, None, None)[0].softmax(-1).max(-1)
        pos = torch.where(ids[0] == MASK_ID, probs.values, -1.0).argmax()
        ids[0, pos] = probs.indices[pos]
    return ids[0, len(prompt) :].tolist()


def words(ids: list[int]) -> str:
    """Text for the reference tokenizer: token id 17 is the word t17."""
    return " ".join(f"t{i}" for i in ids)


def write_task(root: Path, name: str, docs: list[dict], body: str) -> Path:
    """An lm-eval task over a local JSONL file; ``body`` holds the task-specific YAML lines."""
    root.mkdir(parents=True, exist_ok=True)
    data = root / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n" + body
    )
    return root


@pytest.fixture(scope="session")
def ref_tasks(tmp_path_factory, ref) -> Path:
    """Two small tasks in the reference tokenizer's words: multiple choice and generation."""
    root = tmp_path_factory.mktemp("tasks")
    mc = []
    for i, run in enumerate(ref["cases"]["loglikelihood"]["runs"][:4]):
        answer = words(run["answer"])
        other = words([(t + 1) % 240 for t in run["answer"]])
        mc.append({"prompt": words(run["prompt"]), "choices": [" " + answer, " " + other], "label": i % 2})
    write_task(
        root, "ref_mc", mc,
        'output_type: multiple_choice\ndoc_to_text: "{{prompt}}"\ndoc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\ntarget_delimiter: \"\"\nmetric_list:\n  - metric: acc\n",
    )
    gen = [{"prompt": words(run["prompt"]), "answer": "t1"} for run in ref["cases"]["generate"]["runs"][:4]]
    write_task(
        root, "ref_gen", gen,
        'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        "generation_kwargs:\n  until: [t248]\n  max_gen_toks: 8\n  steps: 8\n  block_length: 4\n"
        "metric_list:\n  - metric: exact_match\n",
    )
    return root
