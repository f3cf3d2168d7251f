"""Settings judged as early as what decides them is known (issue 17): what model_args alone fix
when the model is built, every task's generation settings before lm-eval runs any request (also
through --use_cache, and for a library calling generate_until), our errors printed alone by the
``lm_eval`` command, ``dlmskip check``, lm-eval's ``-1`` read back as an integer, and log lines
that never land on a progress bar's line."""

from __future__ import annotations

import argparse
import logging
import sys

import pytest
import yaml
from lm_eval.api.instance import Instance
from lm_eval.api.model import CachingLM

from lm_eval_dlmskip.common.errors import ArgumentError
from lm_eval_dlmskip.harness.gen_kwargs import resolve_generation
from lm_eval_dlmskip.harness.llada import LLaDASkipLM
from lm_eval_dlmskip.harness.model_args import parse_model_args

from .conftest import words
from .test_harness import make_lm


def build_tasks(root) -> dict:
    """The ref_mc and ref_gen tasks (conftest: ref_gen decodes 8 tokens, 8 steps, blocks of 4) as
    lm-eval's ``evaluate`` receives them, built from their YAML without lm-eval's task index."""
    from lm_eval.api.task import ConfigurableTask

    tasks = {name: ConfigurableTask(config=yaml.safe_load((root / f"{name}.yaml").read_text()))
             for name in ("ref_mc", "ref_gen")}
    return {"tasks": tasks, "groups": {}, "group_map": {}}


class Spy:
    """Records which request methods of a model were called, and refuses to run them."""

    def __init__(self, lm, monkeypatch) -> None:
        self.called: list[str] = []
        for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
            monkeypatch.setattr(lm, name, self._recorder(name))

    def _recorder(self, name):
        def record(requests, *args, **kwargs):
            self.called.append(name)
            raise AssertionError(f"{name} ran ({len(requests)} requests)")
        return record


# ---- item 1: lengths ---------------------------------------------------------------------------
@pytest.mark.parametrize("user, task, expected", [
    ({"block_length": 3}, {"max_gen_toks": 6}, (6, 6, 3)),
    ({"steps": 5, "block_length": 4}, {"max_gen_toks": 4}, (4, 5, 4)),
    ({"gen_length": 8, "steps": 3}, {"max_gen_toks": 5}, (8, 3, 8)),
])
def test_lengths_a_task_can_complete_are_left_to_the_task(ref_dir, user, task, expected):
    """Only what no task can fix is refused from model_args alone: each of these fits a task (the
    hand-worked lengths: gen_length, steps, block_length), so the model is built."""
    from lm_eval_dlmskip.harness.gen_kwargs import LLADA

    args = parse_model_args({"pretrained": str(ref_dir), **user}, LLaDASkipLM)
    settings, _, _ = resolve_generation(task, args.decoding, LLADA)
    assert (settings.gen_length, settings.steps, settings.block_length) == expected


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "use_cache"])
def test_a_task_whose_lengths_cannot_be_honoured_fails_before_any_request(ref_dir, ref_tasks, tmp_path, monkeypatch, wrap):
    """lm-eval's evaluate with a likelihood task first and a generation task whose lengths do not fit
    (block_length=3 against its 8 tokens): refused before lm-eval builds or runs any request, naming
    the task and each value's source; through --use_cache's CachingLM too."""
    from lm_eval import evaluator

    lm = make_lm(ref_dir, block_length=3)
    spy = Spy(lm, monkeypatch)
    task_dict = build_tasks(ref_tasks)
    for task in task_dict["tasks"].values():
        monkeypatch.setattr(task, "build_all_requests", lambda **_: spy.called.append("build_all_requests"))
    model = CachingLM(lm, str(tmp_path / "cache.db")) if wrap else lm
    with pytest.raises(ArgumentError, match=r"task ref_gen: gen_length=8 is not a multiple of block_length=3; .*"
                                            r"block_length=3 \(model_args, over the task's 4\)"):
        evaluator.evaluate(lm=model, task_dict=task_dict)
    assert spy.called == []


def test_generate_until_judges_every_request_before_decoding_any(ref_dir, ref, monkeypatch):
    """A library calling generate_until with a good and a bad task: the bad one is refused before
    the good one (sorted first: longer prompts) decodes a single batch."""
    lm = make_lm(ref_dir, block_length=4, batch_size=1)
    decoded = []
    monkeypatch.setattr(lm, "decode", lambda *a, **k: decoded.append(1))
    prompts = [r["prompt"] for r in ref["cases"]["generate"]["runs"] if "prompt" in r]
    good = [Instance("generate_until", {}, (words(p * 3), {"until": [], "max_gen_toks": 8}), 0, ("good", i, 1))
            for i, p in enumerate(prompts)]
    bad = [Instance("generate_until", {}, (words(prompts[0]), {"until": [], "max_gen_toks": 6}), 0, ("bad", 0, 1))]
    with pytest.raises(ArgumentError, match=r"1 task\(s\) cannot be honoured .*task bad: gen_length=6 is not a multiple "
                                            r"of block_length=4"):
        lm.generate_until(good + bad)
    assert decoded == []
    with pytest.raises(ArgumentError, match="task good: gen_length=8 leaves no room for a prompt within max_length=8"):
        make_lm(ref_dir, max_length=8).generate_until(good)


# ---- item 6: errors of our settings alone, and dlmskip check ------------------------------------
def test_python_callers_get_the_argument_error_as_a_value_error(ref_dir):
    with pytest.raises(ValueError) as caught:
        make_lm(ref_dir, gen_length=8, block_length=3)
    assert type(caught.value) is ArgumentError and caught.value.model == "llada_skip"
    assert str(caught.value).startswith("llada_skip: gen_length=8 is not a multiple of block_length=3")


def test_the_lm_eval_command_judges_model_args_first_and_prints_our_error_alone(ref_dir, capsys, monkeypatch):
    """The lm_eval command's run (wrapped by the start-up hook): our model_args are judged before
    lm-eval reads its configuration or indexes tasks, and the error is one line, exit status 2."""
    from lm_eval._cli.run import Run
    from lm_eval.config.evaluate_config import EvaluatorConfig

    def never(*_, **__):
        raise AssertionError("lm-eval went on to read its configuration and tasks")

    monkeypatch.setattr(EvaluatorConfig, "from_cli", never)
    args = argparse.Namespace(model="llada_skip", model_args={"pretrained": str(ref_dir), "mc_num": -1.0}, config=None)
    with pytest.raises(SystemExit) as exit_:
        Run._execute(args)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "llada_skip: error: mc_num=-1 must be a positive integer\n"
    args.model_args["mc_num"] = 16  # fine: lm-eval goes on
    with pytest.raises(AssertionError, match="went on to read its configuration"):
        Run._execute(args)


def _check(capsys, *argv: str) -> tuple[int, str, str]:
    from lm_eval_dlmskip.cli import main

    code = main(["check", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dlmskip_check_runs_the_models_own_checks(ref_dir, capsys):
    code, out, _ = _check(capsys, "--model", "llada_skip", "--model_args", f"pretrained={ref_dir},gen_length=8,block_length=4")
    assert code == 0 and out.splitlines()[-1] == "OK"
    code, _, err = _check(capsys, "--model", "llada_skip", "--model_args", f"pretrained={ref_dir},gen_length=8,block_length=3")
    assert code == 2 and err.startswith("dlmskip check: error: llada_skip: gen_length=8 is not a multiple of block_length=3")
    code, _, err = _check(capsys, "--model", "dream_skip", "--model_args", f"pretrained={ref_dir}")
    assert code == 2 and "expected Dream, found LLaDA (model_type=llada): use --model llada_skip" in err
    code, _, err = _check(capsys, "--model", "hf_skip", "--model_args", f"pretrained={ref_dir}")
    assert code == 2 and "is a LLaDA checkpoint (model_type='llada'), a diffusion LM: use --model llada_skip" in err


def test_dlmskip_check_judges_the_tasks_generation_settings(ref_dir, ref_tasks, capsys):
    args = ["--tasks", "ref_mc,ref_gen", "--include_path", str(ref_tasks)]
    code, out, _ = _check(capsys, "--model", "llada_skip", "--model_args", f"pretrained={ref_dir},steps=16", *args)
    assert code == 0
    assert out.splitlines() == [
        "llada_skip: model_args OK (every check made before the model loads)",
        "ref_gen: decodes with gen_length=8 (task), steps=16 (model_args, over the task's 8), block_length=4 (task)",
        "ref_mc: multiple_choice, scored by likelihood: no generation settings",
        "OK",
    ]
    code, _, err = _check(capsys, "--model", "llada_skip", "--model_args", f"pretrained={ref_dir},block_length=3", *args)
    assert code == 2 and "task ref_gen: gen_length=8 is not a multiple of block_length=3" in err


# ---- item 10: lm-eval's -1.0, and log lines above the progress bar -------------------------------
def test_a_negative_integer_from_the_lm_eval_command_line_is_judged_as_typed(ref_dir):
    """lm-eval's command line reads "-1" as -1.0 (only unsigned digits become ints): the error and
    the echo show the integer the user typed."""
    from lm_eval._cli.utils import key_val_to_dict

    assert key_val_to_dict("mc_num=-1,seed=-7") == {"mc_num": -1.0, "seed": -7.0}  # lm-eval's reading
    with pytest.raises(ArgumentError, match=r"^llada_skip: mc_num=-1 must be a positive integer$"):
        LLaDASkipLM.create_from_arg_obj(key_val_to_dict(f"pretrained={ref_dir},mc_num=-1"))
    with pytest.raises(ArgumentError, match=r"mc_num=-1.5 must be a positive integer"):
        LLaDASkipLM.create_from_arg_obj(key_val_to_dict(f"pretrained={ref_dir},mc_num=-1.5"))
    lm = LLaDASkipLM.create_from_arg_obj(key_val_to_dict(f"pretrained={ref_dir},seed=-7,device=cpu"))
    seed = lm.get_model_info()["dlmskip"]["seed"]
    assert seed == -7 and type(seed) is int


def _visible_lines(text: str) -> list[str]:
    """What a terminal shows of each line: the text after its last carriage return."""
    return [line.rsplit("\r", 1)[-1] for line in text.split("\n")]


def test_log_lines_do_not_land_on_the_progress_bar(ref_dir, ref, capsys):
    """lm-eval logs through a console handler on its "lm_eval" logger while our bars run on the same
    stream: every warning must start its own line (the bar's text is never in front of it)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("lm_eval")
    logger.addHandler(handler)
    try:
        lm = make_lm(ref_dir, steps=4, max_length=10, batch_size=1)
        long_prompt = words(list(range(1, 9)))
        lm.generate_until([Instance("generate_until", {}, (long_prompt, {"until": [], "max_gen_toks": 4, "steps": 2}),
                                    0, ("g", 0, 1))])
        lm.loglikelihood([Instance("loglikelihood", {}, (long_prompt + " t9 t10", " t42"), 0, ("l", 0, 1))])
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert "generate_until" in err and "loglikelihood" in err  # the bars were drawn on this stream
    warnings = [line for line in _visible_lines(err) if "WARNING" in line]
    assert [line.split(" ", 2)[1] for line in warnings] == ["llada_skip", "prompt", "context"]
    assert all(line.startswith("WARNING ") for line in warnings), warnings
