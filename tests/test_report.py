"""calibrate (the static paper's Algorithm 1), analyze and sweep."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from lm_eval_dlmskip.harness.llada import LLaDASkipLM
from lm_eval_dlmskip.report import analyze, calibrate
from lm_eval_dlmskip.report.calibrate import consecutive_similarity, select_blocks

from .conftest import words


def test_similarity_by_hand():
    h0 = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    h1 = torch.tensor([[[1.0, 1.0], [0.0, 3.0]]])  # cos 1/sqrt(2) and 1
    h2 = torch.tensor([[[-1.0, -1.0], [3.0, 0.0]]])  # cos -1 and 0
    every = torch.ones(1, 2, dtype=torch.bool)
    s = consecutive_similarity([h0, h1, h2], every)
    assert torch.allclose(s, torch.tensor([[(2**-0.5 + 1) / 2, -0.5]]))
    first_only = torch.tensor([[True, False]])
    assert torch.allclose(consecutive_similarity([h0, h1, h2], first_only), torch.tensor([[2**-0.5, -1.0]]))


def test_selection_follows_algorithm_1():
    sims = [0.90, 0.99, 0.98, 0.97, 0.96, 0.50, 0.995]
    # most similar first: 6, then 1; 2 is adjacent to 1; 3 is free; 4 adjacent to 3; threshold 0.95
    assert select_blocks(sims, threshold=0.95, max_skip=10) == [6, 1, 3]
    assert select_blocks(sims, threshold=0.95, max_skip=2) == [6, 1]
    assert select_blocks(sims, threshold=0.975, max_skip=10) == [6, 1]  # 3 is below the threshold
    assert select_blocks(sims, threshold=0.95, max_skip=10, allow_adjacent=True) == [6, 1, 2, 3, 4]
    assert select_blocks([0.97, 0.97, 0.97], threshold=0.9, max_skip=3) == [0, 2]  # ties: lower index first
    assert select_blocks(sims, threshold=1.0, max_skip=3) == []


def test_similarity_of_the_fixture_hidden_states(ref_model, ref_tensors):
    reference = [ref_tensors[f"forward.hidden_states.{i}"] for i in range(7)]
    ids = ref_tensors["forward.input_ids"]
    prompt = ids != 250  # the positions Algorithm 1 reads (here: the unmasked ones)
    expected = consecutive_similarity(reference, prompt)
    ours = consecutive_similarity(ref_model.hidden_states(ids), prompt)
    assert ours.shape == (2, 6) and torch.allclose(ours, expected, atol=1e-5)
    mean = expected.mean(0).tolist()
    order = sorted(range(6), key=lambda b: -mean[b])
    first = order[0]
    chosen = select_blocks(mean, threshold=-1.0, max_skip=2)
    assert chosen[0] == first and abs(chosen[1] - first) > 1


def _jsonl(tmp_path, ref, with_targets=True):
    pairs = [(r["prompt"], r["answer"]) for r in ref["cases"]["loglikelihood"]["runs"]]
    pairs += [(r["prompt"], r["output"][len(r["prompt"]):]) for r in ref["cases"]["generate"]["runs"][:4]]
    rows = [{"prompt": words(p), "target": " " + words(a) if with_targets else ""} for p, a in pairs]
    path = tmp_path / "calib.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _calibrate_args(ref_dir, tmp_path, data, **kwargs):
    parser = argparse.ArgumentParser()
    calibrate.add_arguments(parser)
    args = parser.parse_args(["--model", str(ref_dir), "--data", str(data), "--output", str(tmp_path / "profile.json")])
    for k, v in kwargs.items():
        setattr(args, k, v)
    return args


def test_calibrate_writes_a_profile_the_harness_accepts(tmp_path, ref_dir, ref):
    args = _calibrate_args(ref_dir, tmp_path, _jsonl(tmp_path, ref), threshold=-1.0, max_skip=3,
                           mask_fractions="1.0,0.5", answer_length=6, dtype="float32")
    assert calibrate.run_calibrate(args) == 0
    profile = json.loads((tmp_path / "profile.json").read_text())
    assert len(profile["skip_layers"]) == 3 and profile["paper_layers"] == [b + 1 for b in profile["skip_layers"]]
    assert sorted(profile["selection_order"]) == profile["skip_layers"]
    assert set(profile["similarity"]["by_mask_fraction"]) == {"1.0", "0.5"}
    assert len(profile["similarity"]["mean"]) == 6 and profile["data"]["n_prompts"] == 9
    assert "0-based" in profile["numbering"]
    assert profile["selection_order"] == select_blocks(profile["similarity"]["mean"], -1.0, 3)
    lm = LLaDASkipLM(pretrained=str(ref_dir), device="cpu", skip_profile=str(tmp_path / "profile.json"))
    assert sorted(lm.policy.layers) == profile["skip_layers"]
    first = LLaDASkipLM(pretrained=str(ref_dir), device="cpu", skip_profile=str(tmp_path / "profile.json"), skip_k=1)
    assert sorted(first.policy.layers) == profile["selection_order"][:1]
    info = first.get_model_info()["dlmskip"]["skip"]
    assert info["method"] == "static" and info["k"] == 1 and info["skip_profile"].endswith("profile.json")
    with pytest.raises(ValueError, match="skip_k=5: the profile"):
        LLaDASkipLM(pretrained=str(ref_dir), device="cpu", skip_profile=str(tmp_path / "profile.json"), skip_k=5)
    with pytest.raises(ValueError, match="skip_profile and router both given|skip_layers and skip_profile both given"):
        LLaDASkipLM(pretrained=str(ref_dir), device="cpu", skip_profile=str(tmp_path / "profile.json"), skip_layers=[1])


def test_profile_for_another_model_is_refused(tmp_path, ref_dir, ref):
    calibrate.run_calibrate(_calibrate_args(ref_dir, tmp_path, _jsonl(tmp_path, ref), dtype="float32"))
    profile = json.loads((tmp_path / "profile.json").read_text())
    profile["base_model"]["fingerprint"] = "0" * 16
    (tmp_path / "other.json").write_text(json.dumps(profile))
    with pytest.raises(ValueError, match="was measured on .* pass allow_mismatch=True"):
        LLaDASkipLM(pretrained=str(ref_dir), device="cpu", skip_profile=str(tmp_path / "other.json"))
    LLaDASkipLM(pretrained=str(ref_dir), device="cpu", skip_profile=str(tmp_path / "other.json"), allow_mismatch=True)
    with pytest.raises(ValueError, match="no such file; make one with dlmskip calibrate"):
        LLaDASkipLM(pretrained=str(ref_dir), device="cpu", skip_profile=str(tmp_path / "none.json"))


def test_partly_masked_states_need_reference_answers(tmp_path, ref_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("t1 t2 t3\nt4 t5\n")
    args = _calibrate_args(ref_dir, tmp_path, prompts, mask_fractions="0.5", dtype="float32")
    with pytest.raises(ValueError, match="partly masked states .* need reference answers"):
        calibrate.run_calibrate(args)
    args.mask_fractions = "1.0"
    assert calibrate.run_calibrate(args) == 0


def test_analyze_writes_the_four_pictures(tmp_path, ref_dir, ref):
    parser = argparse.ArgumentParser()
    analyze.add_arguments(parser)
    args = parser.parse_args(["--model", str(ref_dir), "--data", str(_jsonl(tmp_path, ref)), "--out", str(tmp_path / "an"),
                              "--gen-length", "8", "--steps", "4", "--block-length", "4", "--limit", "5"])
    assert analyze.run_analyze(args) == 0
    for name in ("similarity_profile", "similarity_heatmap", "tokenwise_similarity", "hidden_norms"):
        png = (tmp_path / "an" / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, name
    data = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert len(data["similarity"]) == 4 and len(data["similarity"][0]) == 5 and len(data["similarity"][0][0]) == 6
    assert len(data["norm_mean"]) == 7


def test_analyze_measures_and_selects_as_calibrate_does(tmp_path, ref_dir, ref):
    """Same prompts and settings: analyze's profile holds calibrate's numbers and marks its blocks."""
    data = _jsonl(tmp_path, ref)
    settings = ["--limit", "7", "--threshold", "0.5", "--max-skip", "2", "--mask-fractions", "1.0,0.5",
                "--answer-length", "6", "--positions", "all", "--seed", "3", "--dtype", "float32"]
    assert calibrate.run_calibrate(_calibrate_args(ref_dir, tmp_path, data)) == 0  # default settings
    profile = json.loads((tmp_path / "profile.json").read_text())
    parser = argparse.ArgumentParser()
    calibrate.add_arguments(parser)
    calibrate.run_calibrate(parser.parse_args(["--model", str(ref_dir), "--data", str(data), "--output",
                                               str(tmp_path / "same.json"), *settings]))
    same = json.loads((tmp_path / "same.json").read_text())
    assert same["similarity"]["mean"] != profile["similarity"]["mean"]  # the settings matter
    parser = argparse.ArgumentParser()
    analyze.add_arguments(parser)
    args = parser.parse_args(["--model", str(ref_dir), "--data", str(data), "--out", str(tmp_path / "an"),
                              "--gen-length", "4", "--decode-limit", "2", *settings])
    assert analyze.run_analyze(args) == 0
    measured = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert measured["calibration"]["similarity"] == same["similarity"]
    assert measured["calibration"]["selection_order"] == same["selection_order"] != []
    assert measured["calibration"]["data"] == same["data"] and same["data"]["n_prompts"] == 7
    assert measured["n_decoded"] == 2 and len(measured["similarity"][0]) == 2
    analyze_defaults, calibrate_defaults = argparse.ArgumentParser(), argparse.ArgumentParser()
    analyze.add_arguments(analyze_defaults)
    calibrate.add_arguments(calibrate_defaults)
    shared = {"limit", "threshold", "max_skip", "allow_adjacent", "mask_fractions", "answer_length", "positions",
              "batch_size", "seed"}
    assert {k: analyze_defaults.get_default(k) for k in shared} == {k: calibrate_defaults.get_default(k) for k in shared}


def test_analyze_refuses_an_out_that_is_a_file_before_loading_the_model(tmp_path, capsys):
    from lm_eval_dlmskip.cli import main

    taken = tmp_path / "taken.png"
    taken.write_text("")
    code = main(["analyze", "--model", str(tmp_path / "no_model_here"), "--data", str(taken), "--out", str(taken)])
    assert code == 2
    assert f"--out {taken} is a file; give a folder path" in capsys.readouterr().err


def test_analyze_refuses_a_decode_limit_below_one_before_loading_the_model(tmp_path, capsys):
    from lm_eval_dlmskip.cli import main

    code = main(["analyze", "--model", str(tmp_path / "no_model_here"), "--data", str(tmp_path / "none.jsonl"),
                 "--out", str(tmp_path / "an"), "--decode-limit", "0"])
    assert code == 2
    assert "--decode-limit 0: give 1 or more prompts to decode" in capsys.readouterr().err


def test_matplotlib_is_a_plain_dependency():
    from pathlib import Path

    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("matplotlib") for d in project["dependencies"])
