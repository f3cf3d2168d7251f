"""(prompt, target) pairs for router training, from lm-eval task definitions or a JSONL file.

From a task, each document of its training split (its validation split when it has none) is
rendered with the task's own prompt format: ``doc_to_text`` for the prompt, and for the target
``doc_to_target`` (generation tasks) or the correct entry of ``doc_to_choice`` (multiple choice),
joined with the task's ``target_delimiter``. So a router learns on the text the harness will show
the model. Texts are tokenized the way lm-eval scores them: context and continuation are encoded
together and split, with trailing spaces of the context moved into the continuation.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pair:
    prompt: list[int]
    target: list[int]


def _task_manager(task: str, include_path: str | None):
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


def task_texts(task: str, include_path: str | None = None, split: str = "train") -> tuple[list[tuple[str, str]], str]:
    """(prompt, target) texts of a task's training split (``split="train"``; its validation split when
    it has none, said in the log) or evaluation split (``"eval"``: test, else validation), and a note
    saying which split was used. A group (e.g. mmlu) gives the texts of all its tasks."""
    texts, notes = [], []
    for t in _task_manager(task, include_path).load(task)["tasks"].values():
        name = t.config.task
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
            texts.append((t.doc_to_text(doc), t.config.target_delimiter + _target_text(t, doc)))
            count += 1
        notes.append(f"{name}:{used}[{count}]")
    if not texts:
        raise ValueError(f"--task {task!r} has no documents")
    return texts, ", ".join(notes)


def _target_text(task, doc) -> str:
    target = task.doc_to_target(doc)
    if task.config.output_type == "multiple_choice":
        choices = task.doc_to_choice(doc)
        return choices[target] if isinstance(target, int) else str(target)
    if isinstance(target, list):
        target = target[0]
    return str(target)


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
    for prompt, target in texts:
        if prompt:
            ctx, cont = TemplateLM._encode_pair(encoder, prompt, target)
        else:
            ctx, cont = [tokenizer.eos_token_id], encoder.tok_encode(target)
        if not cont or len(cont) >= max_length:
            dropped += 1
            continue
        pairs.append(Pair(ctx[-(max_length - len(cont)) :], cont))
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
