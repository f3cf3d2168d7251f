"""--target-ratio's last step: the routers' offset chosen on the evaluation's own forwards.

The held-out calibration (budget.py) measures masked forwards of the training pairs, but lm_eval's
forwards are not those: generation fills a canvas of ``max_gen_toks`` with the model's own tokens
and keeps the least confident positions masked, a multiple-choice task also scores the wrong
choices, and ``cache=dual`` runs window forwards. On the demo, routers calibrated to 0.70 held out
executed 0.650 of the blocks in generation and 0.553 in multiple choice (docs/routers-budget/).
So the last step runs lm_eval itself: the model class ``lm_eval --model`` uses, with the routers
and the ``--eval-model-args`` the evaluation will be given, over the training task's held-out
documents (requests built by the task, as ``lm_eval`` builds them), and bisects one more offset on
every router's execute logit until the share of blocks those forwards execute (the results'
``normalized_flops_papers``) is within ``CALIBRATION_TOLERANCE`` of R.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..data import task_manager
from ..harness.base import DiffusionSkipLM
from ..harness.dream import DreamSkipLM
from ..harness.llada import LLaDASkipLM
from ..harness.llada2 import LLaDA2SkipLM
from ..skipping.routers import Routers
from .budget import Calibration, calibrated

log = logging.getLogger("lm_eval_dlmskip.train")

MODELS: dict[str, type[DiffusionSkipLM]] = {"llada": LLaDASkipLM, "dream": DreamSkipLM, "llada2": LLaDA2SkipLM}
SET_HERE = ("pretrained", "revision", "router", "skip_layers", "skip_random", "skip_profile", "skip_k", "peft")


def eval_model_args(text: str | None, family: str, pretrained: str) -> dict:
    """``--eval-model-args`` parsed as the ``lm_eval`` command line parses ``--model_args`` and judged
    by the model class (no checkpoint read): an unknown key or a bad value fails before training."""
    from lm_eval._cli.utils import key_val_to_dict

    given = key_val_to_dict(text) if text else {}
    clash = sorted(k for k in given if k in SET_HERE)
    if clash:
        raise ValueError(f"--eval-model-args {text!r}: {clash[0]} is set by dlmskip train (the model, its routers); "
                         "give the other model_args the evaluation will use, e.g. mc_num=8,cache=dual,threshold=0.9")
    if family not in MODELS:
        raise ValueError(f"--target-ratio calibrates through lm_eval's {', '.join(m.decoding.model for m in MODELS.values())}; "
                         f"a {family} checkpoint has no such model")
    try:
        MODELS[family].check_arguments({"pretrained": pretrained, **given})
    except ValueError as err:
        raise ValueError(f"--eval-model-args {text!r}: {err}") from None
    return given


@dataclass(frozen=True)
class HeldOutDocs:
    """The documents of the training split that training held out, as lm_eval addresses them."""

    task_dict: dict  # lm-eval task name -> task object, evaluating its training split
    samples: dict[str, list[int]]  # task name -> document indices
    description: str


def held_out_docs(task: str, include_path: str | None, held_out: Iterable[int], num_fewshot: int | None) -> HeldOutDocs:
    """The training task's documents at the held-out text indices (``Pair.origin``: data.task_texts
    renders the documents of each sub-task's training split, else validation split, in order),
    with each task set to evaluate that split, its few-shot count as training rendered it."""
    tasks = task_manager(task, include_path).load(task)["tasks"]
    wanted = sorted(set(held_out))
    task_dict, samples, start = {}, {}, 0
    for name, t in tasks.items():
        split = t.config.training_split if t.has_training_docs() else t.config.validation_split
        count = len(t.training_docs() if t.has_training_docs() else t.validation_docs())
        ids = [i - start for i in wanted if start <= i < start + count]
        start += count
        if not ids:
            continue
        own = t.get_config("num_fewshot")
        if num_fewshot is not None and own != 0:  # as lm_eval --num_fewshot and data.task_texts
            t.set_config(key="num_fewshot", value=num_fewshot)
        t.config.test_split = split  # lm_eval evaluates its test split; the shots then never show the doc itself
        t.config.validation_split = None
        task_dict[name], samples[name] = t, ids
    if not samples:
        raise ValueError(f"--task {task}: no held-out document to calibrate on (raise --val-fraction)")
    description = ", ".join(f"{name}: {len(ids)} held-out documents of its {tasks[name].config.test_split} split"
                            for name, ids in samples.items())
    return HeldOutDocs(task_dict, samples, description)


def executed_share(lm: DiffusionSkipLM, tasks: Sequence[str]) -> tuple[float, int]:
    """Blocks executed and forwards run so far for ``tasks``, from the model's FLOPs meter."""
    totals = [lm.meter.totals[t] for t in tasks if t in lm.meter.totals]
    return sum(t.executed_blocks for t in totals), sum(t.forwards for t in totals)


def calibrate_through_lm_eval(lm: DiffusionSkipLM, trained: Routers, docs: HeldOutDocs, target: float,
                              apply_chat_template: bool = False, fewshot_as_multiturn: bool = False,
                              seed: int = 1234) -> Calibration:
    """Shift ``trained`` (in place) by the offset whose lm_eval forwards over ``docs`` execute the
    share ``target`` of the blocks. Each trial loads the shifted routers into ``lm`` as lm_eval will
    load the checkpoint (cast to the evaluation dtype after the shift), so the offset found is the
    one the saved routers evaluate with."""
    from lm_eval.evaluator import evaluate

    evaluated, tasks = lm.policy.routers, list(docs.samples)
    for t in docs.task_dict.values():
        t.set_fewshot_seed(seed=seed)  # lm_eval's --fewshot_random_seed default

    def measure(trial: Routers) -> float:
        evaluated.load_state_dict(trial.state_dict())  # in place: compiled and captured graphs read these tensors
        blocks, forwards = executed_share(lm, tasks)
        evaluate(lm, docs.task_dict, samples=docs.samples, bootstrap_iters=0, log_samples=False, verbosity="WARNING",
                 apply_chat_template=apply_chat_template, fewshot_as_multiturn=fewshot_as_multiturn)
        after_blocks, after_forwards = executed_share(lm, tasks)
        return (after_blocks - blocks) / max(after_forwards - forwards, 1) / lm.cfg.n_layers

    return calibrated(trained, measure, target, f"lm_eval's forwards over {docs.description}")


def calibrate_evaluation(cfg, folder: str, trained: Routers, held_out: Iterable[int], family: str,
                         device: str) -> tuple[Calibration, str]:
    """``trained``, saved in ``folder``, calibrated through lm_eval on the training task's held-out
    documents (``cfg`` is the run's TrainConfig); returns the calibration and what it ran on."""
    given = eval_model_args(cfg.eval_model_args, family, cfg.model)
    docs = held_out_docs(cfg.task, cfg.include_path, held_out, cfg.num_fewshot)
    runtime = {k: v for k, v in (("device", device), ("batch_size", 16)) if k not in given}  # lm_eval's --device, --batch_size
    lm = MODELS[family].create_from_arg_obj({"pretrained": cfg.model, "revision": cfg.revision, "router": folder, **given}, runtime)
    result = calibrate_through_lm_eval(lm, trained, docs, cfg.target_ratio, cfg.apply_chat_template, cfg.fewshot_as_multiturn)
    where = f"lm_eval ({MODELS[family].decoding.model}) over {docs.description}" + (f", model_args {cfg.eval_model_args}" if given else "")
    return result, where
