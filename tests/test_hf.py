"""hf_skip: lm-eval's HF causal LM with decoder layers skipped, on a tiny random Qwen2 built here.

The defining property: skipping layer l gives what the same weights give with layer l removed
(num_hidden_layers - 1), for loglikelihoods and for greedy generation through the KV cache.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

from lm_eval_dlmskip.harness.hf import HFSkipLM
from lm_eval_dlmskip.models.hf_layers import find_layers
from lm_eval_dlmskip.report import analyze, calibrate

from .conftest import write_task
from .processes import lm_eval

N_LAYERS = 4


def save_qwen2(path: Path, state: dict[str, torch.Tensor] | None = None, layers: int = N_LAYERS, seed: int = 0) -> dict:
    """A tiny Qwen2 with a byte-level tokenizer (one token per character, "!" = id 0); random
    weights large enough that every layer changes the outputs, or ``state``."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

    config = Qwen2Config(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=256, pad_token_id=256, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config)
    if state is None:
        generator = torch.Generator().manual_seed(seed)
        state = {k: torch.randn(v.shape, generator=generator) * 0.3 for k, v in model.state_dict().items()}
    model.load_state_dict(state, strict=True)
    model.save_pretrained(path)
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    Qwen2Tokenizer(vocab=vocab, merges=[], eos_token="<|endoftext|>", pad_token="<|endoftext|>").save_pretrained(path)
    return state


def without_layer(state: dict[str, torch.Tensor], removed: int) -> dict[str, torch.Tensor]:
    """The same weights with decoder layer ``removed`` taken out and the later ones renumbered."""
    out = {}
    for key, value in state.items():
        if key.startswith("model.layers."):
            index = int(key.split(".")[2])
            if index == removed:
                continue
            key = key.replace(f"model.layers.{index}.", f"model.layers.{index - (index > removed)}.", 1)
        out[key] = value
    return out


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> dict[str, Path]:
    """The tiny Qwen2, the same weights without layer 0 and without layer 1, and another Qwen2."""
    root = tmp_path_factory.mktemp("qwen")
    state = save_qwen2(root / "full")
    for removed in (0, 1):
        save_qwen2(root / f"without{removed}", without_layer(state, removed), layers=N_LAYERS - 1)
    save_qwen2(root / "other", seed=1)
    return {name: root / name for name in ("full", "without0", "without1", "other")}


def make(path: Path, **kwargs) -> HFSkipLM:
    return HFSkipLM(pretrained=str(path), **{"device": "cpu", "dtype": "float32", "batch_size": 4, **kwargs})


def text(i: int, n: int) -> str:
    return "".join(chr(97 + (i * 7 + j * 3) % 26) for j in range(n))


def ll_requests(task: str = "t_ll") -> list[Instance]:
    """Contexts of different lengths (padded batches), some continuations ending in "!" (id 0, the pad)."""
    return [
        Instance("loglikelihood", {}, (text(i, 5 + 2 * i), " " + text(i + 1, 1 + i % 3) + "!" * (i % 2)), 0,
                 metadata=(task, i, 1))
        for i in range(6)
    ]


def gen_requests(task: str = "t_gen") -> list[Instance]:
    kwargs = {"until": ["zz"], "max_gen_toks": 10, "do_sample": False}
    return [Instance("generate_until", {}, (text(i, 4 + 3 * i), kwargs), 0, metadata=(task, i, 1)) for i in range(5)]


@pytest.mark.parametrize("layer", [1, 0])
def test_skipping_a_layer_is_removing_it(qwen, layer):
    """Same loglikelihoods and the same greedy text through the KV cache (layer 0 skipped: the
    cache length transformers reads from layer 0 must still count every token)."""
    skipping = make(qwen["full"], skip_layers=[layer])
    removed = make(qwen[f"without{layer}"], backend="causal")
    plain = make(qwen["full"])
    assert skipping.loglikelihood(ll_requests()) == removed.loglikelihood(ll_requests())
    assert skipping.loglikelihood(ll_requests()) != plain.loglikelihood(ll_requests())
    generated = skipping.generate_until(gen_requests())
    assert generated == removed.generate_until(gen_requests())
    assert generated != plain.generate_until(gen_requests())


def test_a_statically_skipped_layer_never_runs(qwen):
    lm = make(qwen["full"], skip_layers=[1, 2])
    calls = []
    for i, wrapped in enumerate(find_layers(lm.model)):
        wrapped.layer.register_forward_hook(lambda module, args, out, i=i: calls.append(i))
    lm.loglikelihood(ll_requests()[:2])
    lm.generate_until(gen_requests()[:1])
    assert calls and set(calls) == {0, 3}


def test_random_k_does_not_depend_on_the_batch(qwen):
    """Each request draws its k layers from (seed, its tokens); rows with different sets share a
    batch, and every answer is what the request gets alone."""
    batched = make(qwen["full"], skip_random=2, seed=7, batch_size=4)
    alone = make(qwen["full"], skip_random=2, seed=7, batch_size=1)
    tables, begin = [], batched.schedule.begin

    def recording_begin(ids, real):
        begin(ids, real)
        tables.append(batched.schedule.executed.tolist())

    batched.schedule.begin = recording_begin
    scores, scores_alone = batched.loglikelihood(ll_requests()), alone.loglikelihood(ll_requests())
    # float32 matmuls over other batch shapes differ in the last bits; another draw moves a score by far more
    assert [s for s, _ in scores] == pytest.approx([s for s, _ in scores_alone], abs=1e-5)
    assert [g for _, g in scores] == [g for _, g in scores_alone]
    generated = batched.generate_until(gen_requests())
    assert generated == alone.generate_until(gen_requests())
    assert all(sum(row) == N_LAYERS - 2 for table in tables for row in table)
    mixed = [table for table in tables if len({tuple(row) for row in table}) > 1]
    assert len(mixed) >= 2  # loglikelihood and generation batches whose rows skip different layers
    other_seed = make(qwen["full"], skip_random=2, seed=8, batch_size=4)
    assert other_seed.generate_until(gen_requests()) != generated


def test_flops_per_task_reach_get_model_info(qwen):
    lm = make(qwen["full"], skip_layers=[1], batch_size=1)
    lm.loglikelihood(ll_requests("t_a")[:2] + ll_requests("t_b")[2:3])
    lm.generate_until(gen_requests()[:1])
    info = lm.get_model_info()["dlmskip"]
    assert info["skip"] == {"method": "static", "skip_layers": [1], "k": 1} and info["n_layers"] == N_LAYERS
    flops = info["flops"]
    assert set(flops) == {"t_a", "t_b", "t_gen"}
    assert flops["t_a"]["forwards"] == 2 and flops["t_b"]["forwards"] == 1
    for summary in flops.values():
        assert summary["normalized_flops_papers"] == 0.75 and summary["mean_executed_blocks"] == 3.0
        assert summary["block_execution_ratio"] == [1.0, 0.0, 1.0, 1.0]
        assert 0.75 < summary["normalized_flops_whole_model"] < 1.0  # embeddings and head are not skipped
    # Generation: a prefill over the prompt, then one token per step: 10 forwards for 10 new tokens.
    prompt = len(gen_requests()[0].args[0])
    assert flops["t_gen"]["forwards"] == 10
    assert flops["t_gen"]["tokens_per_forward"] == pytest.approx((prompt + 9) / 10)
    plain = make(qwen["full"], batch_size=1)
    plain.generate_until(gen_requests()[:1])
    assert plain.get_model_info()["dlmskip"]["flops"]["t_gen"]["normalized_flops_whole_model"] == 1.0


def test_use_cache_refuses_another_skip_set_and_says_what_it_served(qwen, tmp_path):
    """lm-eval keys cached answers by the request alone: a cache written with other skip settings
    (or dtype) is refused, and answers it serves are named as left out of the FLOPs."""
    from lm_eval.api.model import CachingLM

    cache = str(tmp_path / "cache.db")
    first = CachingLM(make(qwen["full"], skip_layers=[1]), cache).loglikelihood(ll_requests()[:2])
    again = make(qwen["full"], skip_layers=[1])
    assert CachingLM(again, cache).loglikelihood(ll_requests()[:2]) == first  # same settings: served
    assert again.get_model_info()["dlmskip"]["answers_served_by_use_cache"] == 2
    for other in ({"skip_layers": [2]}, {"skip_layers": [1], "dtype": "bfloat16"}):
        with pytest.raises(ValueError, match="--use_cache: this cache was written by hf_skip with other settings"):
            CachingLM(make(qwen["full"], **other), cache)


def _calibrate(model: Path, tmp_path: Path, **kwargs) -> Path:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": text(i, 12), "target": " " + text(i, 4)}) + "\n" for i in range(6)))
    parser = argparse.ArgumentParser()
    calibrate.add_arguments(parser)
    output = tmp_path / "profile.json"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {"threshold": -1.0, "max_skip": 2, **kwargs}.items()]
    args = parser.parse_args(["--model", str(model), "--data", str(data), "--output", str(output), "--dtype", "float32", *flags])
    assert calibrate.run_calibrate(args) == 0
    return output


def test_calibrate_an_hf_model_then_skip_its_profile(qwen, tmp_path):
    path = _calibrate(qwen["full"], tmp_path)
    profile = json.loads(path.read_text())
    assert profile["base_model"]["family"] == "hf" and profile["base_model"]["model_type"] == "qwen2"
    assert profile["base_model"]["n_layers"] == N_LAYERS and len(profile["similarity"]["mean"]) == N_LAYERS
    assert profile["data"]["mask_fractions"] is None and len(profile["skip_layers"]) == 2
    lm = make(qwen["full"], skip_profile=str(path), skip_k=1)
    first = profile["selection_order"][0]
    assert lm.get_model_info()["dlmskip"]["skip"]["skip_layers"] == [first]
    assert lm.loglikelihood(ll_requests()) == make(qwen["full"], skip_layers=[first]).loglikelihood(ll_requests())


def test_calibrate_similarity_is_that_of_the_hidden_states(qwen, tmp_path):
    """S[l]: cos(input of layer l, its output) averaged over each prompt's tokens, then over prompts
    (the reference answer follows the prompt and, the model being causal, changes nothing there)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    profile = json.loads(_calibrate(qwen["full"], tmp_path).read_text())
    model = AutoModelForCausalLM.from_pretrained(str(qwen["full"]), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(qwen["full"]))
    per_prompt = []
    for i in range(6):
        states = model(torch.tensor([tokenizer.encode(text(i, 12))]), output_hidden_states=True).hidden_states
        per_prompt.append([torch.nn.functional.cosine_similarity(a[0], b[0], dim=-1).mean().item()
                           for a, b in zip(states, states[1:])])
    expected = torch.tensor(per_prompt).mean(0).tolist()
    assert profile["similarity"]["mean"] == pytest.approx(expected, abs=1e-5)


def test_a_profile_from_another_model_is_refused(qwen, tmp_path):
    path = _calibrate(qwen["full"], tmp_path)
    with pytest.raises(ValueError, match=r"measured on .*n_layers=4.*this model has n_layers=3"):
        make(qwen["without1"], skip_profile=str(path))
    with pytest.raises(ValueError, match="fingerprint.*allow_mismatch=True"):
        make(qwen["other"], skip_profile=str(path))
    assert make(qwen["other"], skip_profile=str(path), allow_mismatch=True).schedule is not None
    llada = json.loads(path.read_text())
    llada["base_model"].pop("family")
    llada["base_model"].pop("model_type")
    (tmp_path / "llada.json").write_text(json.dumps(llada))
    with pytest.raises(ValueError, match="made for LLaDA, while this model is HF causal LM"):
        make(qwen["full"], skip_profile=str(tmp_path / "llada.json"))


def test_an_hf_profile_is_refused_by_llada_skip(qwen, tmp_path, ref_dir):
    from lm_eval_dlmskip.harness.llada import LLaDASkipLM

    path = _calibrate(qwen["full"], tmp_path)
    with pytest.raises(ValueError, match=r"made for HF causal LM \(qwen2\), while this model is LLaDA"):
        LLaDASkipLM(pretrained=str(ref_dir), device="cpu", skip_profile=str(path))


def test_bad_skip_args_fail_before_the_weights_load(qwen, tmp_path):
    """A checkpoint folder with a config and no weights: these errors come before loading."""
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    (config_only / "config.json").write_text((qwen["full"] / "config.json").read_text())
    cases = [
        ({"skip_layers": [4]}, r"skip_layers: 4 is out of range; blocks are 0-based, 0..3 \(the papers number them 1..4\)"),
        ({"skip_layers": "4,6"}, r"write a list as skip_layers=\[4,6,8\]"),
        ({"skip_random": 5}, "5 blocks cannot be drawn from 4"),
        ({"skip_layers": [1], "skip_random": 1}, "skip_layers and skip_random both given"),
        ({"skip_k": 1}, "skip_k is given without skip_profile"),
        ({"skip_layer": [1]}, "unknown model_args key 'skip_layer'. Did you mean 'skip_layers'"),
        ({"skip_profile": str(tmp_path / "none.json")}, "no such file; make one with dlmskip calibrate"),
        ({"skip_random": -1.0}, "skip_random=-1: give the number"),  # lm-eval's command line reads -1 as -1.0
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            make(config_only, **args)


@pytest.mark.parametrize("fixture, family, model", [("llada-tiny-reference", "LLaDA", "llada"),
                                                    ("dream-reference", "Dream", "Dream")])
def test_a_diffusion_checkpoint_given_to_hf_skip_names_its_model(monkeypatch, fixture, family, model):
    """transformers knows neither model type ("does not recognize this architecture"): say which
    --model runs it, before HFLM loads anything."""
    from lm_eval.models.huggingface import HFLM

    monkeypatch.setattr(HFLM, "__init__", lambda *a, **k: pytest.fail("HFLM started loading"))
    path = Path(__file__).parent / "fixtures" / fixture
    with pytest.raises(ValueError, match=rf"^hf_skip: {path} is a {family} checkpoint \(model_type='{model}'\), a "
                                         rf"diffusion LM: use --model {family.lower()}_skip$"):
        make(path)


@pytest.mark.parametrize("model", ["llada", "dream"])
def test_an_hf_checkpoint_given_to_a_diffusion_model_names_hf_skip(qwen, model):
    from lm_eval_dlmskip.harness.check import model_class

    with pytest.raises(ValueError, match=r"expected (LLaDA|Dream), found an autoregressive HF model \(Qwen2ForCausalLM, "
                                         r"model_type='qwen2'\): use --model hf_skip"):
        model_class(f"{model}_skip")(pretrained=str(qwen["full"]), device="cpu")


def test_layers_that_cannot_be_found_are_named():
    class TinyRecurrentLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cells = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    with pytest.raises(ValueError, match=r"cannot find the decoder layers of TinyRecurrentLM: looked for .*model\.layers"):
        find_layers(TinyRecurrentLM())


def test_analyze_an_hf_model_draws_what_applies(qwen, tmp_path, capsys):
    data = tmp_path / "prompts.txt"
    data.write_text("\n".join(text(i, 10) for i in range(3)))
    parser = argparse.ArgumentParser()
    analyze.add_arguments(parser)
    out = tmp_path / "analysis"
    args = parser.parse_args(["--model", str(qwen["full"]), "--data", str(data), "--out", str(out), "--dtype", "float32"])
    assert analyze.run_analyze(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["analysis.json", "hidden_norms.png", "similarity_profile.png",
                                                   "tokenwise_similarity.png"]
    assert "no denoising steps: similarity_heatmap.png is not drawn" in capsys.readouterr().out
    assert len(json.loads((out / "analysis.json").read_text())["similarity"][0][0]) == N_LAYERS


@pytest.mark.slow
def test_lm_eval_cli_runs_hf_skip_and_writes_flops(qwen, tmp_path):
    docs = [{"prompt": text(i, 8), "choices": [" " + text(i, 2), " " + text(i + 1, 2)], "label": i % 2} for i in range(4)]
    tasks = write_task(tmp_path / "tasks", "hf_mc", docs,
                       'output_type: multiple_choice\ndoc_to_text: "{{prompt}}"\ndoc_to_choice: "{{choices}}"\n'
                       "doc_to_target: label\ntarget_delimiter: \"\"\nmetric_list:\n  - metric: acc\n")
    write_task(tasks, "hf_gen", [{"prompt": text(i, 6), "answer": "ab"} for i in range(3)],
               'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
               "generation_kwargs:\n  until: [zz]\n  max_gen_toks: 6\n  do_sample: false\n"
               "metric_list:\n  - metric: exact_match\n")
    out = tmp_path / "results"
    done = lm_eval("--model", "hf_skip", "--model_args", f"pretrained={qwen['full']},dtype=float32,skip_layers=[1,3]",
                   "--tasks", "hf_mc,hf_gen", "--include_path", str(tasks), "--device", "cpu", "--batch_size", "2",
                   "--output_path", str(out))
    assert "normalized FLOPs 0.5000 (papers)" in done.stderr
    flops_table = done.stdout.index("hf_skip FLOPs per task", done.stdout.index("|  Metric   |"))
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in done.stdout[flops_table:].splitlines()[3:] if line.startswith("|")}
    assert set(rows) == {"hf_mc", "hf_gen"} and rows["hf_mc"][0] == rows["hf_gen"][0] == "0.5000"
    [results_file] = list(out.rglob("results_*.json"))
    results = json.loads(results_file.read_text())
    info = results["config"]["dlmskip"]
    assert info["skip"]["skip_layers"] == [1, 3] and info["model_type"] == "qwen2"
    assert info["flops"]["hf_mc"]["forwards"] == 8 and info["flops"]["hf_gen"]["forwards"] >= 3
    for task in ("hf_mc", "hf_gen"):
        assert info["flops"][task]["block_execution_ratio"] == [1.0, 0.0, 1.0, 0.0]
