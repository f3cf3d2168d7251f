"""``dream_skip`` end to end on the tiny Dream: the real lm_eval CLI, every skip method, calibrate,
analyze, router training and a routed run; the family and decoding errors."""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from lm_eval_dlmskip.decoding.dream import dream_generate
from lm_eval_dlmskip.harness.dream import DreamSkipLM
from lm_eval_dlmskip.harness.llada import LLaDASkipLM

from .conftest import words, write_task
from .processes import lm_eval

DREAM = Path(__file__).parent / "fixtures" / "dream-reference"


@pytest.fixture(scope="module")
def dream_tasks(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dream_tasks")
    rng = random.Random(0)
    mc = [{"prompt": words([rng.randrange(120) for _ in range(5)]), "choices": [" t3 t4", " t7"], "label": i % 2}
          for i in range(4)]
    write_task(root, "dream_mc", mc, 'output_type: multiple_choice\ndoc_to_text: "{{prompt}}"\n'
               'doc_to_choice: "{{choices}}"\ndoc_to_target: label\ntarget_delimiter: ""\nmetric_list:\n  - metric: acc\n')
    gen = [{"prompt": words([rng.randrange(120) for _ in range(4)]), "answer": "t1"} for _ in range(3)]
    write_task(root, "dream_gen", gen, 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\n'
               'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: [t124]\n  max_gen_toks: 8\n  steps: 4\n'
               "  alg: maskgit_plus\nmetric_list:\n  - metric: exact_match\n")
    return root


def test_lm_eval_cli_runs_dream_skip_with_static_skipping(tmp_path, dream_tasks):
    out = tmp_path / "results"
    done = lm_eval(
        "--model", "dream_skip", "--model_args", f"pretrained={DREAM},mc_num=8,mc_batch=4,skip_layers=[1],dtype=float32",
        "--tasks", "dream_mc,dream_gen", "--include_path", str(dream_tasks), "--device", "cpu", "--batch_size", "2",
        "--output_path", str(out),
    )
    assert "dream_mc" in done.stdout and "dream_gen" in done.stdout
    [results_file] = list(out.rglob("results_*.json"))
    results = json.loads(results_file.read_text())
    info = results["config"]["dlmskip"]
    assert info["family"] == "dream" and info["skip"]["skip_layers"] == [1]
    assert info["likelihood"]["estimator"] == "dream"
    for task in ("dream_mc", "dream_gen"):
        assert info["flops"][task]["normalized_flops_papers"] == pytest.approx(3 / 4)
        assert info["flops"][task]["block_execution_ratio"] == [1, 0, 1, 1]
    assert info["flops"]["dream_gen"]["forwards"] == 3 * 4  # three prompts x four steps
    assert "dream_skip [dream_gen] decodes with" in done.stderr and "alg=maskgit_plus (task)" in done.stderr


def test_every_skip_method_and_the_harness_scores_like_the_estimator(tmp_path):
    from lm_eval.api.instance import Instance

    requests = [Instance("loglikelihood", {}, ("t1 t2 t3", " t4 t5"), 0), Instance("loglikelihood", {}, ("t9", " t8"), 0)]
    for r in requests:
        r.task_name = "t"
    scores = {}
    for name, args in (("none", {}), ("static", {"skip_layers": [2]}), ("random", {"skip_random": 1})):
        lm = DreamSkipLM(pretrained=str(DREAM), device="cpu", dtype="float32", mc_num=8, mc_batch=4, **args)
        scores[name] = [s for s, _ in lm.loglikelihood(requests)]
        assert lm.get_model_info()["dlmskip"]["skip"]["method"] == name
    assert scores["none"] != scores["static"] and all(s < 0 for s in scores["none"])
    alone = DreamSkipLM(pretrained=str(DREAM), device="cpu", dtype="float32", mc_num=8, mc_batch=4, batch_size=1)
    assert [s for s, _ in alone.loglikelihood(requests)] == pytest.approx(scores["none"], abs=1e-5)  # batch = alone


def test_calibrate_analyze_train_and_a_routed_run(tmp_path, dream_tasks, monkeypatch):
    from lm_eval_dlmskip.cli import main
    from lm_eval_dlmskip.report import analyze, calibrate

    rng = random.Random(1)
    rows = [{"prompt": words([rng.randrange(120) for _ in range(4)]), "target": " " + words([rng.randrange(120) for _ in range(3)])}
            for _ in range(24)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parser = argparse.ArgumentParser()
    calibrate.add_arguments(parser)
    args = parser.parse_args(["--model", str(DREAM), "--data", str(data), "--output", str(tmp_path / "profile.json"),
                              "--threshold", "-1", "--max-skip", "1", "--dtype", "float32"])
    assert calibrate.run_calibrate(args) == 0
    profile = json.loads((tmp_path / "profile.json").read_text())
    assert profile["base_model"]["family"] == "dream" and len(profile["skip_layers"]) == 1
    lm = DreamSkipLM(pretrained=str(DREAM), device="cpu", skip_profile=str(tmp_path / "profile.json"))
    assert sorted(lm.policy.layers) == profile["skip_layers"]

    parser = argparse.ArgumentParser()
    analyze.add_arguments(parser)
    args = parser.parse_args(["--model", str(DREAM), "--data", str(data), "--out", str(tmp_path / "an"),
                              "--gen-length", "4", "--steps", "2", "--limit", "3"])
    traced = []  # analyze traces Dream's own decoding, not LLaDA's
    monkeypatch.setattr(analyze, "dream_generate", lambda *a: traced.append(a[3]) or dream_generate(*a))
    assert analyze.run_analyze(args) == 0 and (tmp_path / "an" / "similarity_profile.png").exists()
    assert [(s.gen_length, s.steps) for s in traced] == [(4, 2)]
    assert len(json.loads((tmp_path / "an" / "analysis.json").read_text())["similarity"]) == 2  # one per step
    args.block_length, args.out = 2, str(tmp_path / "an2")
    with pytest.raises(ValueError, match="--block-length: Dream decodes the whole answer at once"):
        analyze.run_analyze(args)

    router = tmp_path / "router"
    assert main(["train", "--model", str(DREAM), "--data", str(data), "--output", str(router), "--router-hidden", "8",
                 "--batch-size", "8", "--effective-batch-size", "8", "--warmup-steps", "1", "--dtype", "float32",
                 "--device", "cpu", "--eval-every", "100", "--max-steps", "2"]) == 0
    assert json.loads((router / "router.json").read_text())["base_model"]["family"] == "dream"
    out = tmp_path / "results"
    lm_eval("--model", "dream_skip", "--model_args", f"pretrained={DREAM},router={router},mc_num=4,mc_batch=4,dtype=float32",
            "--tasks", "dream_mc", "--include_path", str(dream_tasks), "--device", "cpu", "--output_path", str(out))
    [results_file] = list(out.rglob("results_*.json"))
    info = json.loads(results_file.read_text())["config"]["dlmskip"]
    assert info["skip"]["method"] == "routed" and info["flops"]["dream_mc"]["forwards"] > 0

    # A router or profile made on Dream does not fit LLaDA, whatever allow_mismatch says.
    ref = Path(__file__).parent / "fixtures" / "llada-tiny-reference"
    with pytest.raises(ValueError, match="made for Dream, while this model is LLaDA"):
        LLaDASkipLM(pretrained=str(ref), device="cpu", router=str(router), allow_mismatch=True)
    with pytest.raises(ValueError, match="made for Dream, while this model is LLaDA"):
        LLaDASkipLM(pretrained=str(ref), device="cpu", skip_profile=str(tmp_path / "profile.json"), allow_mismatch=True)


def test_mismatched_family_and_dream_only_errors(tmp_path):
    broken = tmp_path / "dream"
    shutil.copytree(DREAM, broken)
    (broken / "model.safetensors").write_bytes(b"never read")
    with pytest.raises(ValueError, match=r"expected LLaDA, found Dream \(model_type=Dream\): use --model dream_skip"):
        LLaDASkipLM(pretrained=str(broken), device="cpu")
    ref = Path(__file__).parent / "fixtures" / "llada-tiny-reference"
    with pytest.raises(ValueError, match=r"expected Dream, found LLaDA \(model_type=llada\): use --model llada_skip"):
        DreamSkipLM(pretrained=str(ref), device="cpu")
    # decoding errors come before anything is loaded (the weights here are unreadable)
    with pytest.raises(ValueError, match="cache='dual': cached decoding is not available for dream_skip"):
        DreamSkipLM(pretrained=str(broken), cache="dual")
    with pytest.raises(ValueError, match="alg='greedy'; use one of origin, maskgit_plus, topk_margin, entropy"):
        DreamSkipLM(pretrained=str(broken), alg="greedy")
    with pytest.raises(ValueError, match="dream_skip: unknown model_args key 'block_length'"):
        DreamSkipLM.create_from_arg_string(f"pretrained={broken},block_length=4")
    lm = DreamSkipLM(pretrained=str(DREAM), device="cpu")
    with pytest.raises(ValueError, match=r"generation_kwargs \['remasking'\] are not understood by dream_skip"):
        lm.generation_settings({"until": ["x"], "remasking": "low_confidence"})
    with pytest.raises(NotImplementedError, match="no rolling"):
        lm.loglikelihood_rolling([])
    settings, _, origin = lm.generation_settings({"until": ["x"], "max_gen_toks": 16})
    assert (settings.gen_length, settings.steps, settings.alg, settings.temperature) == (16, 16, "entropy", 0.0)
    assert torch.equal(torch.tensor(lm.likelihood_answer([5, 6])), torch.tensor([5, 6, 127]))
