"""The lm-eval adapter, in process: requests in, scores and text out, settings and FLOPs recorded,
and every bad model_arg refused with a message that names it."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import CachingLM

from lm_eval_dlmskip.decoding.likelihood import LikelihoodSettings, mc_loglikelihood, request_generator
from lm_eval_dlmskip.harness.llada import LLaDASkipLM

from .conftest import EOS_ID, MASK_ID, greedy_answer, model_denoiser, words, write_task

ROOT = Path(__file__).resolve().parents[1]


def make_lm(ref_dir, **kwargs) -> LLaDASkipLM:
    args = {"pretrained": str(ref_dir), "device": "cpu", "mc_num": 16, **kwargs}
    return LLaDASkipLM.create_from_arg_obj(args)


def ll_requests(ref, task="task_a"):
    """The first four fixture cases as the four choices (idx 0..3) of one multiple-choice document."""
    return [
        Instance("loglikelihood", {}, (words(r["prompt"]), " " + words(r["answer"])), i, (task, 0, 1))
        for i, r in enumerate(ref["cases"]["loglikelihood"]["runs"][:4])
    ]


def choices(context: str, continuations: list[str], task: str, doc: int = 0) -> list[Instance]:
    """The requests of one multiple-choice document."""
    return [Instance("loglikelihood", {}, (context, c), i, (task, doc, 1)) for i, c in enumerate(continuations)]


def gen_requests(ref, gen_kwargs, task="task_g"):
    prompts = [r["prompt"] for r in ref["cases"]["generate"]["runs"] if "prompt" in r]
    return [Instance("generate_until", {}, (words(p), dict(gen_kwargs)), i, (task, i, 1)) for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def lm(ref_dir):
    return make_lm(ref_dir, batch_size=4)


def test_loglikelihood_is_the_estimator_on_the_tokenized_request(lm, ref, ref_model):
    scores = lm.loglikelihood(ll_requests(ref))
    runs = ref["cases"]["loglikelihood"]["runs"][:4]
    for (score, greedy), run in zip(scores, runs):
        settings = LikelihoodSettings(mc_num=16)
        gen = [request_generator(lm.args.mc_seed, run["prompt"], run["answer"])]
        direct = mc_loglikelihood(model_denoiser(ref_model), [run["prompt"]], [run["answer"]], settings, MASK_ID, EOS_ID, gen, torch.device("cpu"))
        assert score == pytest.approx(direct[0], abs=1e-4)
        assert greedy is False  # choices of a multiple-choice document: lm-eval does not read is_greedy
    assert scores[0][0] == pytest.approx(runs[0]["expected_loglik"], abs=1e-4)  # one-token answer: exact


def test_loglikelihood_does_not_depend_on_batch_size(ref_dir, ref):
    one = make_lm(ref_dir, batch_size=1).loglikelihood(ll_requests(ref))
    four = make_lm(ref_dir, batch_size=4).loglikelihood(ll_requests(ref))
    assert [s for s, _ in one] == pytest.approx([s for s, _ in four], abs=1e-4)


def _record_inputs(lm: LLaDASkipLM) -> list[torch.Tensor]:
    """The ids of every forward the harness runs (they show the Monte-Carlo masks drawn)."""
    seen, model = [], lm.model

    def forward(ids, attention_mask=None, **kwargs):
        seen.append(ids.clone())
        return model(ids, attention_mask, **kwargs)

    lm.model = forward
    return seen


def test_seed_alone_draws_the_random_blocks(ref_dir):
    """skip_random's blocks follow seed (and the row), never mc_seed: the same forward with another
    mc_seed runs the same blocks for every row, with another seed other blocks."""
    ids = torch.randint(0, 200, (8, 12), generator=torch.Generator().manual_seed(0))

    def executed(**seeds) -> torch.Tensor:
        lm = make_lm(ref_dir, skip_random=3, **seeds)
        with torch.no_grad():
            return lm.model(ids, policy=lm.policy)[1].executed

    base = executed(seed=5, mc_seed=1)
    assert (base.sum(1) == 6 - 3).all()
    assert torch.equal(executed(seed=5, mc_seed=9), base)
    assert not torch.equal(executed(seed=6, mc_seed=1), base)


def test_mc_seed_alone_draws_the_masks(ref_dir, ref):
    """A random-skip run with its own seed scores with the base run's masks; only mc_seed changes them."""
    requests = ll_requests(ref)[1:]  # answers of several tokens: the masks are random
    base, random_k = make_lm(ref_dir), make_lm(ref_dir, skip_random=2, seed=5)
    seen_base, seen_random = _record_inputs(base), _record_inputs(random_k)
    base.loglikelihood(requests)
    random_k.loglikelihood(requests)
    assert len(seen_base) == len(seen_random) and all(torch.equal(a, b) for a, b in zip(seen_base, seen_random))
    scores = [s for s, _ in make_lm(ref_dir, seed=1).loglikelihood(requests)]
    assert [s for s, _ in make_lm(ref_dir, seed=2).loglikelihood(requests)] == scores
    assert [s for s, _ in make_lm(ref_dir, seed=2, mc_seed=7).loglikelihood(requests)] != scores
    assert make_lm(ref_dir, mc_seed=7).get_model_info()["dlmskip"]["mc_seed"] == 7


def test_batch_size_auto_finds_a_size_and_keeps_the_scores(ref_dir, ref):
    lm = make_lm(ref_dir, batch_size="auto", max_batch_size=3)
    assert lm._batch_size(16, 12) == 3  # nothing runs out of memory on the CPU: the upper bound
    auto = lm.loglikelihood(ll_requests(ref))
    assert [s for s, _ in auto] == pytest.approx([s for s, _ in make_lm(ref_dir).loglikelihood(ll_requests(ref))], abs=1e-4)


def _greedy_and_not(ref_model) -> list[tuple[list[int], list[int], bool]]:
    """(prompt, answer, is it the greedy answer) for four prompts: two greedy answers, two not."""
    denoise, cases = model_denoiser(ref_model), []
    for i, prompt in enumerate([[11, 12, 13, 14], [40, 41, 42], [7, 8, 9, 10, 11], [60, 61]]):
        answer = greedy_answer(denoise, prompt, 3)
        cases.append((prompt, answer, True) if i % 2 == 0 else (prompt, [(t + 1) % 240 for t in answer], False))
    return cases


def test_is_greedy_comes_with_every_loglikelihood_task_request(ref_dir, ref_model):
    """A loglikelihood task (one request per document) gets is_greedy without any flag; the choices of
    a multiple-choice document get it only with check_greedy=True, which costs greedy passes."""
    cases = _greedy_and_not(ref_model)
    requests = [Instance("loglikelihood", {}, (words(p), " " + words(a)), 0, ("lambada", i, 1)) for i, (p, a, _) in enumerate(cases)]
    assert [g for _, g in make_lm(ref_dir, batch_size=3).loglikelihood(requests)] == [c[2] for c in cases]
    (p0, a0, _), (_, a1, _) = cases[:2]
    mc = choices(words(p0), [" " + words(a0), " " + words(a1)], "mc")
    lm = make_lm(ref_dir)
    assert [g for _, g in lm.loglikelihood(mc)] == [False, False]
    forwards = lm.get_model_info()["dlmskip"]["flops"]["mc"]["forwards"]
    asked = make_lm(ref_dir, check_greedy=True)
    assert [g for _, g in asked.loglikelihood(mc)] == [True, False]
    assert asked.get_model_info()["dlmskip"]["flops"]["mc"]["forwards"] == forwards + 2 * 3  # a forward per answer token


def test_a_lambada_style_task_scores_greedy_answers(tmp_path, ref_dir, ref_model):
    """Through lm-eval: a loglikelihood task's acc is the share of documents whose answer is greedy."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    docs = [{"context": words(p), "target": " " + words(a)} for p, a, _ in _greedy_and_not(ref_model)]
    root = write_task(
        tmp_path / "tasks", "ref_lambada", docs,
        'output_type: loglikelihood\ndoc_to_text: "{{context}}"\ndoc_to_target: "{{target}}"\ntarget_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n",
    )
    results = simple_evaluate(model=make_lm(ref_dir, batch_size=4), tasks=["ref_lambada"], task_manager=TaskManager(include_path=str(root)))
    assert results["results"]["ref_lambada"]["acc,none"] == 0.5


def test_generation_is_upstream_and_independent_of_batch_size(ref_dir, ref):
    kwargs = {"until": [], "max_gen_toks": 16, "steps": 16, "block_length": 8}
    one = make_lm(ref_dir, batch_size=1).generate_until(gen_requests(ref, kwargs))
    four = make_lm(ref_dir, batch_size=4).generate_until(gen_requests(ref, kwargs))
    assert one == four
    run = ref["cases"]["generate"]["runs"][2]  # steps 16, gen_length 16, block_length 8
    upstream = words(run["output"][len(run["prompt"]):])
    assert one[2] == upstream


def test_sampled_generation_does_not_depend_on_batch_size(ref_dir, ref):
    """temperature 1 and random remasking: batch 1 and batch 4 decode the same text for a seed, and
    the sampler samples (another seed, or greedy decoding, give other text)."""
    kwargs = {"until": [], "max_gen_toks": 8, "steps": 8, "block_length": 4, "temperature": 1.0, "remasking": "random"}
    requests = gen_requests(ref, kwargs)
    assert len(requests) == 5
    one = make_lm(ref_dir, batch_size=1).generate_until(requests)
    assert make_lm(ref_dir, batch_size=4).generate_until(requests) == one
    assert make_lm(ref_dir, batch_size=4, seed=7).generate_until(requests) != one
    greedy = make_lm(ref_dir, batch_size=4).generate_until(gen_requests(ref, {"until": [], "max_gen_toks": 8, "steps": 8, "block_length": 4}))
    assert greedy != one


def test_until_cuts_the_text(ref_dir, ref):
    run = ref["cases"]["generate"]["runs"][1]  # steps 8, gen_length 16, block_length 4
    answer = run["output"][len(run["prompt"]):]
    lm = make_lm(ref_dir)
    kwargs = {"until": [], "max_gen_toks": 16, "steps": 8, "block_length": 4}
    [full] = lm.generate_until(gen_requests(ref, kwargs)[1:2])
    assert full == words(answer)
    [cut] = lm.generate_until(gen_requests(ref, {**kwargs, "until": ["t177"]})[1:2])
    assert cut == words(answer[: answer.index(177)])  # the re-tokenizing drops the trailing space


def test_special_tokens_are_removed_after_cutting(lm):
    assert lm.decode_answer([5, 251, 251, 6, 253], []) == "t5 t6"
    assert lm.decode_answer([5, 7, 251, 6], ["t7"]) == "t5"


def test_model_args_override_task_generation_kwargs(ref_dir):
    """One precedence for every decoding setting: model_args the user typed, else the task's
    generation_kwargs, else the default (gen_length: max_gen_toks; steps, block_length: gen_length)."""
    lm = make_lm(ref_dir, steps=4, block_length=4, gen_length=8, temperature=0.5)
    settings, until, origin = lm.generation_settings({"until": "t3", "max_gen_toks": 8})
    assert (settings.gen_length, settings.steps, settings.block_length, settings.temperature) == (8, 4, 4, 0.5)
    assert until == ["t3"] and origin["steps"] == "4 (model_args)"
    task = {"until": [], "max_gen_toks": 8, "steps": 16, "block_length": 8, "gen_length": 8, "temperature": 0.0, "remasking": "random"}
    settings, _, origin = lm.generation_settings(task)
    assert (settings.gen_length, settings.steps, settings.block_length, settings.temperature) == (8, 4, 4, 0.5)
    assert settings.remasking == "random" and origin["remasking"] == "random (task)"
    assert origin["steps"] == "4 (model_args, over the task's 16)" and origin["temperature"] == "0.5 (model_args, over the task's 0.0)"
    default = make_lm(ref_dir)
    settings, _, origin = default.generation_settings({"until": [], "max_gen_toks": 12, "do_sample": False})
    assert (settings.gen_length, settings.steps, settings.block_length, settings.temperature) == (12, 12, 12, 0.0)
    assert origin["gen_length"] == "12 (task)" and origin["block_length"] == "12 (default: gen_length)"
    settings, _, _ = default.generation_settings({"until": [], "max_gen_toks": 16, "steps": 8, "block_length": 4})
    assert (settings.gen_length, settings.steps, settings.block_length) == (16, 8, 4)


def test_a_user_gen_length_does_not_inherit_the_tasks_steps_and_blocks(ref_dir):
    """gen_length=1024 on gsm8k_llada (256 tokens, 256 steps, one block of 256) would run 4 blocks of
    64 steps nobody asked for: refused, naming both sources, until model_args give steps and blocks."""
    import yaml

    task = yaml.safe_load((ROOT / "tasks" / "gsm8k_llada.yaml").read_text())["generation_kwargs"]
    lm = make_lm(ref_dir, gen_length=1024)
    with pytest.raises(ValueError, match=r"gen_length=1024 \(model_args\) replaces the task's 256, but the task's "
                                         r"steps=256, block_length=256 were set for 256 tokens"):
        lm.generation_settings(task)
    settings, _, _ = make_lm(ref_dir, gen_length=1024, steps=1024, block_length=1024).generation_settings(task)
    assert (settings.gen_length, settings.steps, settings.block_length) == (1024, 1024, 1024)
    settings, _, _ = make_lm(ref_dir, gen_length=256).generation_settings(task)  # the task's own length
    assert (settings.gen_length, settings.steps, settings.block_length) == (256, 256, 256)


def test_settings_that_cannot_be_honoured_name_their_sources(ref_dir):
    with pytest.raises(ValueError, match=r"not a multiple of block_length=3.*gen_length=8 \(task\).*block_length=3 \(model_args\)"):
        make_lm(ref_dir, block_length=3).generation_settings({"max_gen_toks": 8})


def test_generation_settings_are_logged_once_per_task(ref_dir, ref, caplog):
    lm = make_lm(ref_dir, steps=8, batch_size=2)
    kwargs = {"until": [], "max_gen_toks": 8, "steps": 4, "block_length": 8}
    with caplog.at_level(logging.INFO, logger="lm_eval.llada_skip"):
        lm.generate_until(gen_requests(ref, kwargs, task="g1")[:3] + gen_requests(ref, kwargs, task="g2")[:1])
        lm.generate_until(gen_requests(ref, kwargs, task="g1")[:1])
    records = [r for r in caplog.records if "decodes with" in r.getMessage()]
    assert sorted(r.getMessage().split("[")[1].split("]")[0] for r in records) == ["g1", "g2"]
    assert "steps=8 (model_args, over the task's 4)" in records[0].getMessage()
    assert "block_length=8 (task)" in records[0].getMessage()
    assert all(r.levelno == logging.WARNING for r in records)  # a task's value was overridden


def test_generation_kwargs_errors(ref_dir):
    lm = make_lm(ref_dir)
    with pytest.raises(ValueError, match="steps=5 cannot be split evenly over 2 blocks"):
        lm.generation_settings({"max_gen_toks": 8, "steps": 5, "block_length": 4})
    with pytest.raises(ValueError, match=r"\['top_q'\] are not understood"):
        lm.generation_settings({"max_gen_toks": 8, "top_q": 0.5})


def test_flops_per_task_reach_get_model_info(ref_dir, ref):
    lm = make_lm(ref_dir, skip_layers=[1, 3])
    one_token = ref["cases"]["loglikelihood"]["runs"][0]
    lm.loglikelihood(ll_requests(ref, task="mc") + choices(words(one_token["prompt"]), [" " + words(one_token["answer"]), " t9"], "mc2"))
    lm.generate_until(gen_requests(ref, {"until": [], "max_gen_toks": 8, "steps": 8, "block_length": 8}, task="gen"))
    info = lm.get_model_info()["dlmskip"]
    assert set(info["flops"]) == {"mc", "mc2", "gen"}
    for task in info["flops"].values():
        assert task["normalized_flops_papers"] == pytest.approx(4 / 6)
        assert task["block_execution_ratio"] == [1, 0, 1, 0, 1, 1]
    assert info["flops"]["gen"]["forwards"] == 5 * 8  # five prompts, eight denoising steps
    assert info["flops"]["mc2"]["forwards"] == 2  # two one-token answers: one exact sample each
    assert info["skip"] == {"method": "static", "skip_layers": [1, 3], "k": 2}
    assert info["likelihood"]["mc_num"] == 16 and info["fingerprint"]


def test_the_lm_head_is_charged_only_where_logits_are_used(ref_dir):
    """Whole-model FLOPs by hand: a denoising step computes logits for its block only, a one-token
    answer's likelihood sample for its one masked position only."""
    d, kv, f, V, layers = 64, 64, 160, 256, 6  # the reference config

    def forward(n: int, head: int) -> int:
        return 4 * d * n + layers * (n * (2 * d * (2 * d + 2 * kv) + 6 * d * f) + 4 * n * n * d) + 2 * d * V * head

    lm = make_lm(ref_dir)
    kwargs = {"until": [], "max_gen_toks": 8, "steps": 4, "block_length": 4}
    lm.generate_until([Instance("generate_until", {}, ("t5 t6 t7", kwargs), 0, ("gen", 0, 1))])
    choices = [Instance("loglikelihood", {}, ("t5 t6 t7", c), i, ("mc", 0, 1)) for i, c in enumerate([" t9", " t10"])]
    lm.loglikelihood(choices)
    flops = lm.get_model_info()["dlmskip"]["flops"]
    assert flops["gen"]["tflops"] * 1e12 == pytest.approx(4 * forward(3 + 8, 4))  # 2 blocks x 2 steps
    assert flops["mc"]["tflops"] * 1e12 == pytest.approx(2 * forward(4, 1))


def test_cfg_doubles_the_forwards_and_counts_them(ref_dir, ref):
    lm = make_lm(ref_dir, cfg=0.5)
    lm.loglikelihood(choices("t5 t6", [" t7", " t9"], "task_a"))
    assert lm.get_model_info()["dlmskip"]["flops"]["task_a"]["forwards"] == 2 * 2  # two one-token answers, twice


def test_loglikelihood_rolling_sums_windows(ref_dir, ref):
    lm = make_lm(ref_dir, max_length=8)
    text = words(list(range(20, 40)))
    [total] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0, ("ppl", 0, 1))])
    # Disjoint windows of max_length - 1 = 7 tokens, each conditioned on the token before it (EOS for
    # the first); the last window keeps a full-size input, so its context is the two tokens before it.
    t = list(range(20, 40))
    windows = [([EOS_ID], t[0:7]), ([t[6]], t[7:14]), (t[12:14], t[14:20])]
    expected = 0.0
    for context, chunk in windows:
        gen = [request_generator(lm.args.mc_seed, context, chunk)]
        expected += mc_loglikelihood(model_denoiser(lm.model), [context], [chunk], lm.likelihood, MASK_ID, EOS_ID, gen, torch.device("cpu"))[0]
    assert total == pytest.approx(expected, abs=1e-3)


def test_overlong_context_is_left_truncated_with_a_warning(ref_dir, caplog):
    lm = make_lm(ref_dir, max_length=6)
    request = Instance("loglikelihood", {}, (words(range(1, 11)), " t42"), 0, ("t", 0, 1))
    with caplog.at_level(logging.WARNING):
        [(score, _)] = lm.loglikelihood([request])
    assert "left-truncated" in caplog.text
    short = Instance("loglikelihood", {}, (words(range(6, 11)), " t42"), 0, ("t", 0, 1))
    assert score == pytest.approx(make_lm(ref_dir, max_length=6).loglikelihood([short])[0][0], abs=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        ({"skip_layer": [1]}, "unknown model_args key 'skip_layer'. Did you mean 'skip_layers'"),
        ({"skip_layers": "4,6"}, r"write a list as skip_layers=\[4,6,8\]"),
    ],
)
def test_bad_model_args_are_named(ref_dir, args, message):
    with pytest.raises(ValueError, match=message):
        make_lm(ref_dir, **args)


def _bad_paths(tmp: Path) -> dict[str, str]:
    """Paths for the bad-argument cases: missing ones, a folder that is no router, a router folder
    with its two files, a two-block skip profile, garbage JSON, a folder that is no adapter."""
    from lm_eval_dlmskip.skipping.profiles import FORMAT_VERSION, KIND

    (tmp / "empty").mkdir()
    (tmp / "router").mkdir()
    for name in ("router.json", "router.safetensors"):
        (tmp / "router" / name).write_text("{}")
    (tmp / "profile.json").write_text(json.dumps({"kind": KIND, "format": FORMAT_VERSION, "selection_order": [3, 1]}))
    (tmp / "garbage.json").write_text("{ not json")
    return {k: str(tmp / k) for k in ("empty", "router", "profile.json", "garbage.json", "missing")}


@pytest.mark.parametrize(
    "args, message",
    [
        ({"skip_layers": [1], "router": "router"}, "skip_layers and router both given: choose one"),
        ({"skip_random": 2, "skip_profile": "profile.json"}, "skip_random and skip_profile both given"),
        ({"skip_k": 2}, "skip_k is given without skip_profile=PATH"),
        ({"router_tau": 0.2}, "router_tau is given without router=PATH"),
        ({"skip_layers": "4;6"}, r"skip_layers='4;6': write a list as skip_layers=\[4,6,8\]"),
        ({"skip_layers": [-1, 2]}, "skip_layers: -1 is out of range; blocks are 0-based"),
        ({"skip_layers": [2, 2]}, "skip_layers: block 2 is listed twice"),
        ({"skip_layers": ["a"]}, "skip_layers: 'a' is not a block index"),
        ({"skip_random": -1}, "skip_random=-1: give the number of blocks to skip per forward"),
        ({"skip_random": "two"}, "skip_random='two'"),
        ({"router": "missing"}, "no such checkpoint directory"),
        ({"router": "empty"}, "router.json is missing; is this a router checkpoint"),
        ({"router": "router", "router_tau": 1.5}, r"router_tau=1.5 must be a number in \[0, 1\)"),
        ({"skip_profile": "missing"}, "no such file; make one with dlmskip calibrate"),
        ({"skip_profile": "empty"}, "is a directory"),
        ({"skip_profile": "garbage.json"}, "not valid JSON"),
        ({"skip_profile": "profile.json", "skip_k": 5}, r"skip_k=5: the profile .* chose 2 blocks; give 0..2"),
        ({"skip_profile": "profile.json", "skip_k": -1}, "skip_k=-1: give how many"),
        ({"peft": "missing"}, "peft=.*: no such local directory"),
        ({"peft": "empty"}, "adapter_config.json is missing"),
        ({"pretrained": "missing"}, "pretrained=.*: no such local directory"),
        ({"tokenizer": "missing"}, "tokenizer=.*: no such local directory"),
        ({"dtype": "int4"}, "dtype='int4' is not supported; use auto"),
        ({"device": "gpu"}, "device='gpu' is not a torch device"),
        ({"batch_size": 0}, "batch_size=0 must be a positive integer or 'auto'"),
        ({"batch_size": "big"}, "batch_size='big'"),
        ({"max_batch_size": 0}, "max_batch_size=0 must be a positive integer"),
        ({"max_length": -5}, "max_length=-5 must be a positive integer"),
        ({"mc_num": 0}, "mc_num=0 must be a positive integer"),
        ({"mc_num": 100}, "mc_num=100 is not a multiple of mc_batch=16"),
        ({"cfg": "lots"}, "cfg='lots' must be of type float"),
        ({"temperature": -1.0}, "temperature"),
        ({"gen_length": 0}, "gen_length=0 must be a positive integer"),
        # lengths model_args fix completely (no task's settings replace them): issue 17
        ({"gen_length": 8, "block_length": 3}, r"gen_length=8 is not a multiple of block_length=3; choose block_length "
                                               r"dividing gen_length \(gen_length=8, block_length=3 given in model_args"),
        ({"gen_length": 8, "block_length": 16}, "gen_length=8 is not a multiple of block_length=16"),
        ({"gen_length": 8, "block_length": 4, "steps": 3}, "steps=3 cannot be split evenly over 2 blocks"),
        ({"mc_num": -1.0}, "mc_num=-1 must be a positive integer"),  # lm-eval's command line reads -1 as -1.0
        ({"remasking": "sideways"}, "remasking='sideways'"),
        ({"seed": "x"}, "seed='x' must be an integer"),
        ({"compile": "yes"}, "compile='yes' must be True or False"),
    ],
)
def test_bad_model_args_fail_before_anything_loads(tmp_path, monkeypatch, ref_dir, args, message):
    """Every mistake that needs no model is named before the checkpoint or the tokenizer is read."""
    import lm_eval_dlmskip.harness.base as harness

    def never(*_, **__):
        raise AssertionError("the model or tokenizer was loaded before the model_args were checked")

    monkeypatch.setattr(harness, "load_model", never)
    monkeypatch.setattr(harness, "load_tokenizer", never)
    paths = _bad_paths(tmp_path)
    args = {k: paths.get(v, v) if isinstance(v, str) else v for k, v in args.items()}
    with pytest.raises(ValueError, match=message):
        make_lm(ref_dir, **args)


def test_what_needs_the_model_fails_right_after_the_load(monkeypatch, ref_dir):
    """The block range needs n_layers: checked as soon as the checkpoint and its tokenizer (read in
    milliseconds; a router or profile is checked against it too) are in, before anything else is built."""
    import lm_eval_dlmskip.harness.base as harness

    def never(*_, **__):
        raise AssertionError("the FLOPs meter was built before the block range was checked")

    monkeypatch.setattr(harness, "FlopsMeter", never)
    with pytest.raises(ValueError, match=r"skip_layers: 6 is out of range; blocks are 0-based, 0\.\.5"):
        make_lm(ref_dir, skip_layers=[6])
    with pytest.raises(ValueError, match="skip_random: 9 blocks cannot be drawn from 6"):
        make_lm(ref_dir, skip_random=9)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback happens only without CUDA")
def test_cpu_fallback_is_quiet_for_lm_evals_default_device_only(ref_dir, caplog):
    """lm-eval passes device=cuda:0 when --device is not given: falling back from it is INFO; a
    CUDA device the user named otherwise (device=cuda, cuda:1) still warns."""
    with caplog.at_level(logging.INFO, logger="lm_eval.llada_skip"):
        make_lm(ref_dir, device="cuda:0")
        make_lm(ref_dir, device="cuda")
    fallbacks = [(r.levelname, r.getMessage()) for r in caplog.records if "CUDA is not available" in r.getMessage()]
    assert fallbacks == [("INFO", "device=cuda:0 but CUDA is not available; running on cpu"),
                         ("WARNING", "device=cuda but CUDA is not available; running on cpu")]


def test_model_args_string_accepts_a_bracketed_list(ref_dir):
    lm = LLaDASkipLM.create_from_arg_string(f"pretrained={ref_dir},skip_layers=[1,4],device=cpu")
    assert lm.get_model_info()["dlmskip"]["skip"]["skip_layers"] == [1, 4]
    with pytest.raises(ValueError, match="unknown model_args key 'gen_len'"):
        LLaDASkipLM.create_from_arg_string(f"pretrained={ref_dir},gen_len=4")


def test_pad_equal_to_mask_is_refused(tmp_path, ref_dir):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(ref_dir, ckpt)
    config = ckpt / "tokenizer_config.json"
    config.chmod(0o644)
    config.write_text(json.dumps({**json.loads(config.read_text()), "pad_token": "<|mdm_mask|>"}))
    with pytest.raises(ValueError, match="pad id 250 equals the mask id 250"):
        make_lm(ckpt)


def test_use_cache_refuses_a_cache_written_with_other_settings(tmp_path, ref_dir, ref):
    cache = str(tmp_path / "cache.db")
    base = CachingLM(make_lm(ref_dir), cache)
    first = base.loglikelihood(ll_requests(ref)[:2])
    assert CachingLM(make_lm(ref_dir), cache).loglikelihood(ll_requests(ref)[:2]) == first  # same settings: reused
    with pytest.raises(ValueError, match="--use_cache: this cache was written by llada_skip with other settings"):
        CachingLM(make_lm(ref_dir, skip_layers=[2]), cache)


def test_use_cache_key_covers_truncation_dtype_and_tokenizer(tmp_path, ref_dir):
    """max_length (truncation), dtype and the tokenizer change answers, so each is part of the key."""
    cache = str(tmp_path / "cache.db")
    CachingLM(make_lm(ref_dir), cache)
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    shutil.copy(ref_dir / "tokenizer_config.json", tokenizer)
    vocab = json.loads((ref_dir / "tokenizer.json").read_text())
    vocab["model"]["vocab"]["t5"], vocab["model"]["vocab"]["t6"] = vocab["model"]["vocab"]["t6"], vocab["model"]["vocab"]["t5"]
    (tokenizer / "tokenizer.json").write_text(json.dumps(vocab))
    for other in ({"max_length": 16}, {"dtype": "bfloat16"}, {"tokenizer": str(tokenizer)}):
        with pytest.raises(ValueError, match="--use_cache: this cache was written by llada_skip with other settings"):
            CachingLM(make_lm(ref_dir, **other), cache)


def test_answers_served_from_the_cache_keep_their_flops(tmp_path, ref_dir, ref):
    """lm-eval serves a cached answer without calling the model; its FLOPs were stored with it and
    count again, so a run served wholly or partly from the cache reports the FLOPs of one that is not."""
    gen_kwargs = {"until": [], "max_gen_toks": 8, "steps": 8, "block_length": 8}
    texts = [words(range(1, 40)), "t20 t21 t22", "t30 t31"]  # several rolling windows, and one

    def run(cache: str, n: int | None = None) -> dict:
        lm = CachingLM(make_lm(ref_dir, skip_random=2, batch_size=2, max_length=24), str(tmp_path / cache))
        lm.loglikelihood(ll_requests(ref, task="mc")[:n])
        lm.generate_until(gen_requests(ref, gen_kwargs, task="gen")[:n])
        lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i, ("ppl", i, 1)) for i, t in enumerate(texts[:n])])
        return lm.get_model_info()["dlmskip"]["flops"]

    computed = run("full.db")
    assert set(computed) == {"mc", "gen", "ppl"}
    assert run("full.db") == computed  # every answer from the cache
    run("part.db", 2)
    assert run("part.db") == computed  # two answers of each kind from the cache, the others computed


def test_chat_template_is_applied(tmp_path, ref_dir):
    ckpt = tmp_path / "instruct"
    shutil.copytree(ref_dir, ckpt)
    config = ckpt / "tokenizer_config.json"
    config.chmod(0o644)
    template = "{% for m in messages %}<|startoftext|> {{ m['content'] }} <|eot_id|>{% endfor %}{% if add_generation_prompt %} t0{% endif %}"
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": template}))
    lm = make_lm(ckpt)
    prompt = lm.apply_chat_template([{"role": "user", "content": "t5 t6"}])
    assert prompt == "<|startoftext|> t5 t6 <|eot_id|> t0"
    assert lm.tok_encode(prompt) == [252, 5, 6, 253, 0]
    assert lm.chat_template(True) == template


def test_lora_adapter_is_merged(tmp_path, ref_dir, ref_tensors):
    """A PEFT LoRA adapter saved with upstream key names changes the logits exactly as merged weights."""
    from peft import LoraConfig, get_peft_model

    from lm_eval_dlmskip.models.loading import load_llada

    base = load_llada(str(ref_dir)).model
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        expected = peft_model(ref_tensors["forward.input_ids"])[0]
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter))
    lm = make_lm(ref_dir, peft=str(adapter))
    with torch.no_grad():
        got = lm.model(ref_tensors["forward.input_ids"])[0]
    assert (got - expected).abs().max() < 1e-4  # merged weights round differently from W x + B A x
    assert (got - ref_tensors["forward.logits"]).abs().max() > 1e-2


def test_speed_travels_with_the_flops_per_task(ref_dir, ref, monkeypatch):
    """Per task: the wall seconds of its batches (split by requests), generated tokens and rates;
    with the device, batch size, dtype, fast-path switches and each task's decoding settings. The
    clock is stubbed so the figures are exact: every batch takes 2 s."""
    import lm_eval_dlmskip.harness.base as base

    ticks = iter(range(0, 1000, 2))
    monkeypatch.setattr(base, "clock", lambda: next(ticks))
    lm = make_lm(ref_dir, batch_size=2)
    lm.loglikelihood(ll_requests(ref, task="mc"))  # 4 requests: 2 batches
    lm.generate_until(gen_requests(ref, {"until": [], "max_gen_toks": 8, "steps": 8, "block_length": 4}, task="gen")
                      + gen_requests(ref, {"until": [], "max_gen_toks": 8, "steps": 8, "block_length": 4}, task="gen2")[:1])
    info = lm.get_model_info()["dlmskip"]
    mc, gen, gen2 = (info["speed"]["tasks"][task] for task in ("mc", "gen", "gen2"))
    assert mc["wall_seconds"] == 4 and mc["requests_per_s"] == 1 and "tokens_per_s" not in mc
    # six generation requests in 3 batches of 2: 6 s, the one gen2 request's share is half a batch
    assert gen["wall_seconds"] + gen2["wall_seconds"] == 6 and gen2["wall_seconds"] == 1
    assert gen["generated_tokens"] == 5 * 8 and gen["tokens_per_s"] == 40 / 5
    assert gen["forwards_per_s"] == info["flops"]["gen"]["forwards"] / 5
    speed = info["speed"]
    assert speed["device"] == "cpu" and speed["batch_size"] == "2" and speed["dtype"] == "float32"
    assert speed["compile"] is False and speed["cuda_graphs"] is False  # the CPU default: eager
    assert speed["decoding"]["gen"]["block_length"] == 4 and speed["decoding"]["gen"]["gen_length"] == 8
    assert info["compile"] is False
