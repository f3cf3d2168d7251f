"""``dlmskip check``: what ``lm_eval --model llada_skip|dream_skip|hf_skip`` judges before it loads
the model (the model class's own ``check_arguments``) and, given tasks, before it runs any request
(every generation task's settings, as the start-up hook has lm-eval's ``evaluate`` do), in seconds
instead of after lm-eval's start-up. lm-eval's task index is read only when tasks are given."""

from __future__ import annotations

from typing import Any, Mapping

from ..common.errors import argument_errors
from ..models.loading import local_directory, read_config
from .gen_kwargs import generation_tasks, kwargs_key, resolve_tasks

MODELS = ("llada_skip", "dream_skip", "hf_skip")


def model_class(name: str) -> type:
    """The lm-eval model class of one of ``MODELS``."""
    if name == "llada_skip":
        from .llada import LLaDASkipLM

        return LLaDASkipLM
    if name == "dream_skip":
        from .dream import DreamSkipLM

        return DreamSkipLM
    if name == "hf_skip":
        from .hf import HFSkipLM

        return HFSkipLM
    raise ValueError(f"--model {name!r}: dlmskip check judges {', '.join(MODELS)}")


def check_model(model: str, model_args: Mapping[str, Any], tasks: list[str] | None = None,
                include_path: str | None = None) -> list[str]:
    """Lines saying what was judged and found fine; a setting that cannot be honoured raises an
    ``ArgumentError`` (a ValueError), the same lm_eval would raise."""
    cls = model_class(model)
    parsed = cls.check_arguments(model_args)
    max_length = None
    if model != "hf_skip":  # a local checkpoint's config.json: its family, as loading judges it first
        with argument_errors(model):
            path = local_directory(parsed.pretrained)
            config = None if path is None else read_config(path, cls.family)
        max_length = parsed.max_length or (None if config is None else config.max_sequence_length)
    lines = [f"{model}: model_args OK (every check made before the model loads)"]
    if not tasks:
        return lines + ["OK"]
    task_dict = load_tasks(tasks, include_path, dict(model_args))
    pairs = generation_tasks(task_dict)
    if model == "hf_skip":
        lines += [f"{task}: generation settings are lm-eval's HFLM's own" for task, _ in pairs]
    else:
        with argument_errors(model):
            resolved = resolve_tasks(pairs, parsed.decoding, cls.decoding, max_length)
        for task, gen_kwargs in pairs:
            origin = resolved[kwargs_key(gen_kwargs)][2]
            lines.append(f"{task}: decodes with " + ", ".join(f"{k}={v}" for k, v in origin.items()))
        if max_length is None:
            lines.append("(the hub checkpoint's max_length is judged against gen_length when it loads)")
    generating = {task for task, _ in pairs}
    lines += [f"{name}: {task.OUTPUT_TYPE}, scored by likelihood: no generation settings"
              for name, task in task_dict["tasks"].items() if name not in generating]
    return lines + ["OK"]


def load_tasks(tasks: list[str], include_path: str | None, metadata: dict) -> dict:
    """lm-eval's tasks as ``TaskManager.load`` gives them to ``evaluate``; tasks all found under
    ``include_path`` are loaded without indexing lm-eval's own thousands of task files."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False, metadata=metadata)
        if all(local.match_tasks([task]) for task in tasks):
            return local.load(tasks)
    manager = TaskManager(include_path=include_path, metadata=metadata)
    missing = [task for task in tasks if not manager.match_tasks([task])]
    if missing:
        raise ValueError(f"tasks not found: {', '.join(missing)}" + ("" if include_path else " (give --include_path?)"))
    return manager.load(tasks)
