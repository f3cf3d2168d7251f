"""(prompt, target) pairs from lm-eval task definitions or a JSONL file: the data routers are trained
on and skip profiles are calibrated on.

From a task, each document of its training split (its validation split when it has none) is
rendered as lm-eval renders an evaluation request: the prompt is the task's own
``fewshot_context`` (description, few-shot examples drawn by the task's sampler, the document's
``doc_to_text``, optionally a chat template), the target the gold continuation of the request
(multiple choice) or ``doc_to_target`` delimited as the few-shot answers are. So a router learns on
the text the harness will show the model. The sampler is kept from showing a document as its own
example (lm-eval does that only when the few-shot split is the test split). Texts are tokenized the
way lm-eval scores them: context and continuation are encoded together and split, with trailing
spaces of the context moved into the continuation.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pair:
    prompt: list[int]
    target: list[int]
    origin: int = -1  # index of the text it was encoded from (encode_pairs), -1 when made otherwise


def task_manager(task: str, include_path: str | None):
    """lm-eval's TaskManager; indexing lm-eval's own thousands of tasks takes seconds, so a task
    found in ``include_path`` alone is loaded without them."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if task in local.all_tasks:
            return local
    manager = TaskManager(include_path=include_path)
    if task not in manager.all_tasks:
        raise ValueError(f"--task {task!r} is not an lm-eval task here; add --include-path for custom task folders")
    return manager


def task_texts(
    task: str,
    include_path: str | None = None,
    split: str = "train",
    num_fewshot: int | None = 0,
    chat_template: Callable[..., str] | None = None,
    fewshot_as_multiturn: bool = False,
    seed: int = 1234,
) -> tuple[list[tuple[str, str]], str]:
    """(prompt, target) texts of a task's training split (``split="train"``; its validation split when
    it has none, said in the log) or evaluation split (``"eval"``: test, else validation), and a note
    saying which split was used. A group (e.g. mmlu) gives the texts of all its tasks.

    ``num_fewshot`` overrides the task's own as ``lm_eval --num_fewshot`` does (None: the task's
    own; a task that sets 0 keeps 0); ``chat_template`` and ``fewshot_as_multiturn`` are lm-eval's
    (``--apply_chat_template``); ``seed`` seeds the few-shot sampler."""
    texts, notes = [], []
    for t in task_manager(task, include_path).load(task)["tasks"].values():
        name = t.config.task
        own = t.get_config("num_fewshot")
        shots = (own if num_fewshot is None or own == 0 else num_fewshot) or 0
        render = _request_renderer(t, shots, chat_template, fewshot_as_multiturn, seed)
        if split == "train" and t.has_training_docs():
            docs, used = t.training_docs(), "train"
        elif split == "eval" and t.has_test_docs():
            docs, used = t.test_docs(), "test"
        elif t.has_validation_docs():
            docs, used = t.validation_docs(), "validation"
            if split == "train":
                log.warning("%s has no training split; training on its validation split", name)
        else:
            raise ValueError(f"task {name!r} has no {'training' if split == 'train' else 'test'} or validation split")
        count = 0
        for doc in docs:
            texts.append(render(doc))
            count += 1
        notes.append(f"{name}:{used}[{count}]" + (f" {shots}-shot" if shots else ""))
    if not texts:
        raise ValueError(f"--task {task!r} has no documents")
    return texts, ", ".join(notes)


class _NotItself:
    """A task's few-shot sampler that never draws the document being rendered (``doc``): lm-eval
    leaves it out only when the few-shot split is the test split, and training renders documents
    of the very split the shots come from (gsm8k: train)."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler
        self.doc = None

    def sample(self, n: int, eval_doc=None, **kwargs):
        return self.sampler.sample(n, eval_doc=self.doc, **kwargs)


def _request_renderer(
    task, shots: int, chat_template: Callable[..., str] | None, multiturn: bool, seed: int
) -> Callable[[dict], tuple[str, str]]:
    """doc -> (prompt, target), built by the task's own fewshot_context and construct_requests."""
    from lm_eval.api.utils import maybe_delimit

    chat = chat_template is not None
    task.set_fewshot_seed(seed)
    if shots and not hasattr(task, "sampler"):
        raise ValueError(f"task {task.config.task!r} has no documents to draw {shots} few-shot examples from; pass --num-fewshot 0")
    sampler = task.sampler = _NotItself(task.sampler) if shots else None

    def render(doc) -> tuple[str, str]:
        if sampler is not None:
            sampler.doc = doc
        prefix = task.doc_to_prefix(doc)
        context = task.fewshot_context(doc=doc, num_fewshot=shots, apply_chat_template=chat, fewshot_as_multiturn=multiturn,
                                       chat_template=chat_template, gen_prefix=prefix)
        requests = task.construct_requests(doc=doc, ctx=context, metadata=(task.config.task, 0, 1),
                                           apply_chat_template=chat, chat_template=chat_template)
        if task.OUTPUT_TYPE == "multiple_choice":
            return tuple(requests[_gold_index(task, doc)].args[:2])
        if task.OUTPUT_TYPE == "loglikelihood":
            return tuple(requests.args[:2])
        if task.OUTPUT_TYPE != "generate_until":
            raise ValueError(f"task {task.config.task!r} ({task.OUTPUT_TYPE}) has no (prompt, target) pairs; use --data FILE.jsonl")
        answer = _target_text(task, doc)  # delimited as lm-eval delimits the answers of few-shot examples
        if prefix:
            return context, maybe_delimit(prefix, answer)[len(prefix) :]
        return context, answer if chat else task.config.target_delimiter + answer

    return render


def _gold_index(task, doc) -> int:
    """The request of the correct choice, as lm-eval's process_results finds it."""
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    gold = gold[0] if isinstance(gold, list) else gold  # several correct choices: train on the first
    return gold if isinstance(gold, int) else task.doc_to_choice(doc).index(gold)


def _target_text(task, doc) -> str:
    target = task.doc_to_target(doc)
    return str(target[0] if isinstance(target, list) else target)


def render_chat(tokenizer, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """A chat rendered by the tokenizer's template, as llada_skip renders it for
    ``lm_eval --apply_chat_template`` (an unfinished last message is continued)."""
    return tokenizer.apply_chat_template(
        chat_history,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=not add_generation_prompt,
    )


def tokenizer_chat_template(tokenizer) -> Callable[..., str]:
    """The chat rendering ``lm_eval --apply_chat_template`` gets from llada_skip, over ``tokenizer``."""
    if tokenizer.chat_template is None:
        raise ValueError("--apply-chat-template: this checkpoint's tokenizer has no chat template (no chat_template "
                         "in tokenizer_config.json); train without it, as lm_eval would evaluate")
    return partial(render_chat, tokenizer)


def jsonl_texts(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, target) texts from a JSONL file with ``prompt`` and ``target`` fields."""
    texts = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            texts.append((str(row["prompt"]), str(row["target"])))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{number}: each line needs a JSON object with 'prompt' and 'target' ({err})") from err
    if not texts:
        raise ValueError(f"{path}: no examples")
    return texts


def encode_pairs(texts: list[tuple[str, str]], tokenizer, max_length: int) -> list[Pair]:
    """Token pairs, prompts left-truncated to fit ``max_length``; targets that cannot fit are dropped."""
    from lm_eval.api.model import TemplateLM

    encoder = SimpleNamespace(tok_encode=lambda s, **_: tokenizer.encode(s, add_special_tokens=False), backend="causal")
    pairs, dropped = [], 0
    for origin, (prompt, target) in enumerate(texts):
        if prompt:
            ctx, cont = TemplateLM._encode_pair(encoder, prompt, target)
        else:
            ctx, cont = [tokenizer.eos_token_id], encoder.tok_encode(target)
        if not cont or len(cont) >= max_length:
            dropped += 1
            continue
        pairs.append(Pair(ctx[-(max_length - len(cont)) :], cont, origin))
    if dropped:
        log.warning("%d examples dropped: empty target or longer than max_length=%d", dropped, max_length)
    return pairs


def split_validation(pairs: list[Pair], fraction: float, seed: int, max_examples: int = 256) -> tuple[list[Pair], list[Pair]]:
    """A fixed held-out slice (at least one example when there are two or more)."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_val = min(max_examples, max(1 if len(pairs) > 1 else 0, round(len(pairs) * fraction)))
    held = set(order[:n_val])
    return [p for i, p in enumerate(pairs) if i not in held], [pairs[i] for i in order[:n_val]]


def add_source_arguments(parser: argparse.ArgumentParser, task_help: str, data_help: str) -> None:
    """--task / --include-path / --data, as ``train``, ``calibrate`` and ``analyze`` take them."""
    parser.add_argument("--task", help=task_help)
    parser.add_argument("--include-path", help="extra lm-eval task folder")
    parser.add_argument("--data", help=data_help)
