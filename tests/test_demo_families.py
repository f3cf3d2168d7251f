"""``dlmskip demo --family dream|llama``: the tiny Dream and Llama checkpoints load through the real
loaders as their families, and the demo tasks run on every family through the harness.

Cheap: checkpoints trained for a few steps, a few requests in-process. The README's commands for
these families run in tests/test_readme_demo.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from safetensors import safe_open

from lm_eval_dlmskip import demo
from lm_eval_dlmskip.harness.gen_kwargs import DREAM, LLADA, resolve_generation
from lm_eval_dlmskip.models.config import LLaDAConfig
from lm_eval_dlmskip.models.loading import load_model, read_config

DREAM_REFERENCE = Path(__file__).parent / "fixtures" / "dream-reference"


def keys(folder: Path) -> set[str]:
    found = set()
    for file in folder.glob("model*.safetensors"):
        with safe_open(str(file), "pt") as f:
            found |= set(f.keys())
    return found


def generic(names: set[str]) -> set[str]:
    return {re.sub(r"layers\.\d+\.", "layers.N.", name) for name in names}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    for family in ("dream", "llama"):
        demo.build_demo(out, train_steps=3, family=family)
    return out


def test_the_dream_demo_is_written_in_dreams_hub_layout(built):
    """The same key names as the checkpoint Dream's own code wrote (the golden fixture), and a
    config that only the Dream loader takes."""
    assert generic(keys(built / "dream-demo")) == generic(keys(DREAM_REFERENCE))
    assert read_config(built / "dream-demo", "dream").family == "dream"
    with pytest.raises(ValueError, match="use --model dream_skip"):
        read_config(built / "dream-demo", "llada")


def test_the_dream_demo_loads_the_weights_it_was_trained_with(tmp_path):
    """Written under Qwen2's names and read back by the real loader, every weight lands where it
    was: the loaded model's logits are the trained model's."""
    vocab = demo.vocabulary()
    raw = {**demo.DREAM_CONFIG, "vocab_size": len(vocab), "mask_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    trained = demo.train_demo_model(LLaDAConfig.from_dict(raw), vocab, steps=2)
    demo.write_checkpoint(tmp_path, raw, trained, name=demo.dream_name)
    loaded = load_model(str(tmp_path), dtype="float32", family="dream").model
    ids = torch.randint(2, len(vocab), (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids)[0], trained(ids)[0], rtol=0, atol=1e-5)


def test_the_llama_demo_is_a_transformers_causal_lm_with_the_demo_tokenizer(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(built / "llama-demo"))  # as HFLM loads it: one token per word
    vocab = demo.vocabulary()
    assert tokenizer("w3 w7 reverse :")["input_ids"] == [vocab.index(w) for w in ("w3", "w7", "reverse", ":")]
    model = AutoModelForCausalLM.from_pretrained(str(built / "llama-demo"))
    assert type(model).__name__ == "LlamaForCausalLM" and (built / "llama-demo" / "model.safetensors").exists()
    with pytest.raises(ValueError, match="use --model hf_skip"):
        read_config(built / "llama-demo", "llada")


def test_the_demo_generation_task_decodes_on_every_diffusion_family(built):
    """Its generation_kwargs (until and max_gen_toks) are read by LLaDA and Dream alike: 5 tokens in
    5 steps, for LLaDA in one block; a LLaDA-only key in a task is refused by dream_skip."""
    task = (built / "tasks" / "demo_reverse_gen.yaml").read_text()
    assert "block_length" not in task and "steps" not in task
    gen_kwargs = {"until": ["."], "max_gen_toks": demo.ANSWER_TOKENS}
    llada, _, _ = resolve_generation(gen_kwargs, {}, LLADA)
    dream, _, _ = resolve_generation(gen_kwargs, {}, DREAM)
    assert (llada.gen_length, llada.steps, llada.block_length) == (5, 5, 5)
    assert (dream.gen_length, dream.steps) == (5, 5)
    with pytest.raises(ValueError, match=r"\['block_length'\] are not understood by dream_skip"):
        resolve_generation({**gen_kwargs, "block_length": 5}, {}, DREAM)


@pytest.fixture(scope="module")
def requests(built) -> tuple[list[Instance], list[Instance]]:
    """Two documents of each demo task as lm-eval builds their requests (only the demo's task
    folder indexed, not lm-eval's own tasks)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(built / "tasks"), include_defaults=False)
    tasks = manager.load(["demo_reverse_mc", "demo_reverse_gen"])["tasks"]
    out = {}
    for name, task in tasks.items():
        task.build_all_requests(limit=2, rank=0, world_size=1)
        out[name] = list(task.instances)
    return out["demo_reverse_mc"], out["demo_reverse_gen"]


@pytest.mark.parametrize("family", ["dream", "llama"])
def test_a_few_demo_requests_run_through_each_familys_harness(built, requests, family):
    """Loaded through the lm-eval model of the family, with a block skipped; every answer is a
    finite log-likelihood or 5 tokens' worth of text."""
    if family == "dream":
        from lm_eval_dlmskip.harness.dream import DreamSkipLM as Model

        lm = Model(pretrained=str(built / "dream-demo"), device="cpu", mc_num=2, skip_layers=[1], batch_size=4)
    else:
        from lm_eval_dlmskip.harness.hf import HFSkipLM as Model

        lm = Model(pretrained=str(built / "llama-demo"), device="cpu", skip_layers=[1], batch_size=4)
    mc, gen = requests
    scores = lm.loglikelihood(mc)
    assert len(scores) == len(mc) == 6 and all(torch.isfinite(torch.tensor(s[0])) for s in scores)
    texts = lm.generate_until(gen)
    assert len(texts) == 2 and all(len(t.split()) <= demo.ANSWER_TOKENS for t in texts)


def test_a_bad_train_steps_is_refused_before_anything_is_built(tmp_path):
    with pytest.raises(ValueError, match="--train-steps 0: give 1 or more"):
        demo.run_demo(str(tmp_path / "out"), "1,3", "dream", train_steps=0)
    assert not (tmp_path / "out").exists()


def test_hf_skip_scores_the_llama_demo_as_transformers_does(built, requests):
    """The Llama demo through hf_skip (nothing skipped) against the log-probabilities that
    transformers' own forward gives the same tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm_eval_dlmskip.harness.hf import HFSkipLM

    path = str(built / "llama-demo")
    lm = HFSkipLM(pretrained=path, device="cpu", dtype="float32", batch_size=4)
    mc, _ = requests
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    for instance, (score, _) in zip(mc, lm.loglikelihood(mc)):
        context, continuation = (tokenizer(text)["input_ids"] for text in instance.args)
        ids = torch.tensor([context + continuation])
        with torch.no_grad():
            logprobs = model(ids).logits[0, :-1].log_softmax(-1)
        expected = logprobs[torch.arange(len(context) - 1, ids.shape[1] - 1), ids[0, len(context):]].sum().item()
        assert score == pytest.approx(expected, abs=1e-4)
