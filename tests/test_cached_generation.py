"""Cached and threshold decoding against Fast-dLLM's own functions (tests/fixtures/fastdllm-reference):
token for token, the same number of forwards and the same tokens computed per forward; then batches
with padding, batch-size invariance, and skipping in the cached regime."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lm_eval_dlmskip.decoding.generate import GenerationSettings, generate
from lm_eval_dlmskip.decoding.graphs import GraphRunner
from lm_eval_dlmskip.models.loading import load_llada
from lm_eval_dlmskip.skipping.identity import model_identity
from lm_eval_dlmskip.skipping.policies import NO_SKIP, RandomSkip, StaticSkip
from lm_eval_dlmskip.skipping.router_checkpoints import save_routers
from lm_eval_dlmskip.skipping.routers import RouterConfig, Routers

from .conftest import EOS_ID, MASK_ID
from .processes import lm_eval

FASTDLLM = json.loads((Path(__file__).parent / "fixtures" / "fastdllm-reference" / "reference.json").read_text())
CACHE_OF = {"generate": "none", "generate_with_prefix_cache": "prefix", "generate_with_dual_cache": "dual"}


class CountingDenoiser:
    """A denoiser over the model that records the tokens each forward computed."""

    def __init__(self, forward, policy=NO_SKIP) -> None:
        self.forward, self.policy, self.lengths = forward, policy, []

    def __call__(self, ids, attention_mask, logits_at, cache=None, window=None):
        logits, trace = self.forward(ids, attention_mask, policy=self.policy, logits_at=logits_at, cache=cache, window=window)
        self.lengths.append(int(trace.seq_lens[0]))
        return logits


def settings_of(run: dict, cache: str) -> GenerationSettings:
    s = run["settings"]
    return GenerationSettings(s["gen_length"], s["steps"], s["block_length"], cache=cache, threshold=s["threshold"])


@pytest.mark.parametrize("function", sorted(CACHE_OF))
def test_fast_dllm_cases_are_token_identical_with_the_same_forwards(ref_model, function):
    runs = FASTDLLM["cases"][function]["runs"]
    for run in runs:
        denoise = CountingDenoiser(ref_model)
        out = generate(denoise, torch.tensor([run["prompt"]]), None, settings_of(run, CACHE_OF[function]), MASK_ID)
        assert out[0].tolist() == run["output"], (function, run["settings"], run["prompt"])
        assert len(denoise.lengths) == run["nfe"]
        assert denoise.lengths == run["forward_lengths"]
    assert len(runs) >= 90


def _padded_batch(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(map(len, prompts))
    ids = torch.full((len(prompts), P), EOS_ID)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1
    return ids, mask


PROMPTS = [run["prompt"] for run in FASTDLLM["cases"]["generate"]["runs"][:4]]


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("threshold", [None, 0.7, 0.3])
def test_batches_with_padding_decode_each_row_as_alone(ref_model, cache, threshold):
    """Rows finish blocks at different steps under a threshold; a finished row stops changing, and
    every row decodes as it does at batch 1."""
    settings = GenerationSettings(16, 16, 8, cache=cache, threshold=threshold)
    alone = [generate(CountingDenoiser(ref_model), torch.tensor([p]), None, settings, MASK_ID)[0, len(p):] for p in PROMPTS]
    ids, mask = _padded_batch(PROMPTS)
    out = generate(CountingDenoiser(ref_model), ids, mask, settings, MASK_ID)
    for row, expected in zip(out[:, ids.shape[1]:], alone):
        assert row.tolist() == expected.tolist()


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_graph_runner_decodes_as_the_eager_model(ref_model, cache):
    settings = GenerationSettings(16, 16, 8, cache=cache, threshold=0.5)
    ids, mask = _padded_batch(PROMPTS)
    for policy in (NO_SKIP, StaticSkip({1, 4}), RandomSkip(2, 6, seed=0)):
        eager = generate(CountingDenoiser(ref_model, policy), ids, mask, settings, MASK_ID)
        replayed = generate(CountingDenoiser(GraphRunner(ref_model), policy), ids, mask, settings, MASK_ID)
        assert torch.equal(eager, replayed), policy


@pytest.mark.parametrize("decide_every", ["step", "block"])
def test_window_forwards_run_what_the_policy_asks_or_the_fills_set(ref_model, decide_every):
    """"step": the window forwards ask the policy (here: run everything) and run every block, those
    the fill skipped included (the fill wrote their keys and values). "block": they do not ask it at
    all (a random policy would draw other blocks) and run the fill's set until the next fill."""
    settings = GenerationSettings(16, 16, 8, cache="dual", decide_every=decide_every)
    ids, mask = _padded_batch(PROMPTS)
    policy = RandomSkip(2, 6, seed=4)
    window_policy = NO_SKIP if decide_every == "step" else policy
    traces = []

    def denoise(ids, attention_mask, logits_at, cache=None, window=None):
        logits, trace = ref_model(ids, attention_mask, policy=policy if window is None else window_policy,
                                  logits_at=logits_at, cache=cache, window=window)
        traces.append((window is None, trace))
        return logits

    generate(denoise, ids, mask, settings, MASK_ID)
    fills = [i for i, (fill, _) in enumerate(traces) if fill]
    assert len(fills) == 2
    for start, stop in zip(fills, fills[1:] + [len(traces)]):
        fill = traces[start][1].executed
        assert not fill.all() and (fill.sum(1) == 4).all()  # 2 of 6 blocks skipped per row at the fill
        for _, trace in traces[start + 1 : stop]:
            assert trace.executed.all() if decide_every == "step" else torch.equal(trace.executed, fill)
            assert torch.equal(trace.keys, mask.sum(1) + 16)  # the window attends to the whole cached row


@pytest.mark.slow
def test_lm_eval_cli_decodes_with_a_cache_a_threshold_and_skipping(tmp_path, ref_dir, ref_tasks):
    """The real CLI with cache=dual, threshold and static or routed skipping: NFE below the fixed
    schedule's, tokens per forward below the canvas, FLOPs against plain decoding in the results."""
    torch.manual_seed(4)
    routers = Routers(RouterConfig(d_model=64, n_layers=6, hidden=16, init_bias=0.0))
    for r in routers.routers:
        torch.nn.init.normal_(r.net[-1].weight, std=3.0)
    checkpoint = load_llada(str(ref_dir))
    save_routers(tmp_path / "router", routers, model_identity(checkpoint.model.cfg, str(ref_dir), checkpoint.fingerprint),
                 {"lambda": 0.3, "alpha_target": 0.5, "mask_scaling": True})
    for name, skip in (("static", "skip_layers=[1,3]"), ("routed", f"router={tmp_path / 'router'}")):
        out = tmp_path / name
        lm_eval("--model", "llada_skip", "--model_args", f"pretrained={ref_dir},cache=dual,threshold=0.3,{skip}",
             "--tasks", "ref_gen", "--include_path", str(ref_tasks), "--device", "cpu", "--batch_size", "4",
             "--output_path", str(out))
        [results_file] = list(out.rglob("results_*.json"))
        info = json.loads(results_file.read_text())["config"]["dlmskip"]
        flops = info["flops"]["ref_gen"]
        assert info["generation"]["cache"] == "dual" and info["generation"]["threshold"] == 0.3
        assert 2 * 2 <= flops["nfe_per_request"] < 8  # 2 blocks: a fill and a window forward at least; fewer than the 8 steps
        assert flops["tokens_per_forward"] < 12  # windows of 4 among canvases of 12-17 tokens
        assert flops["normalized_flops_vs_plain_decoding"] < flops["normalized_flops_whole_model"] < 1
        if name == "static":
            assert flops["block_execution_ratio"] == [1, 0, 1, 0, 1, 1]
        else:
            assert 0 < flops["normalized_flops_papers"] < 1


def test_decoding_model_args_are_refused_before_loading(tmp_path):
    from lm_eval_dlmskip.harness.llada import LLaDASkipLM

    missing = str(tmp_path / "no-such-checkpoint")
    for args, message in (({"cache": "full"}, "cache='full'"), ({"threshold": 1.5}, "threshold=1.5"),
                          ({"decide_every": "sometimes"}, "decide_every='sometimes'")):
        with pytest.raises(ValueError, match=message):
            LLaDASkipLM.create_from_arg_obj({"pretrained": missing, **args})


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "tasks").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_task_configs_give_valid_decoding_settings(path):
    from lm_eval.tasks._yaml_loader import load_yaml

    from lm_eval_dlmskip.harness.gen_kwargs import resolve_generation

    config = load_yaml(str(path), resolve_func=False)  # MBPP's metric would fetch code_eval from the hub
    settings, until, _ = resolve_generation(config["generation_kwargs"], {})
    assert until and settings.gen_length == config["generation_kwargs"]["max_gen_toks"]
    if path.stem.startswith("gsm8k_fastdllm"):
        assert (settings.block_length, settings.threshold, config["num_fewshot"]) == (32, 0.9, 5)
