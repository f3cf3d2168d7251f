"""Which decoding settings a generation request gets: one precedence rule for every key.

A value the user gave in ``model_args`` wins (typed for this run); the task's ``generation_kwargs``
fill what ``model_args`` leave out; then ``gen_length`` defaults to the task's ``max_gen_toks``,
``steps`` and ``block_length`` to ``gen_length``, the rest to the settings class's defaults. A
model family names its settings class and keys in a ``DecodingSpec`` (LLaDA's, Dream's).

Settings are judged as early as what decides them is known: what ``model_args`` alone decide when
the model is built (``check_user_settings``), every task's before lm-eval runs any request
(``resolve_tasks``, called through the start-up hook), so a wrong length never costs a run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping

from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

from ..decoding.block_diffusion import BlockDiffusionSettings
from ..decoding.dream import DreamGenerationSettings
from ..decoding.generate import GenerationSettings


@dataclass(frozen=True)
class DecodingSpec:
    """A family's decoding settings: the class, the keys model_args and generation_kwargs may
    set, the settings defaulting to gen_length, and the lm-eval kwargs it ignores."""

    model: str  # the lm_eval --model name, for messages
    settings: type
    keys: tuple[str, ...]
    from_length: tuple[str, ...]
    ignored: frozenset[str]
    types: dict[str, type]  # settings whose default (None) does not tell their type


LLADA = DecodingSpec(
    "llada_skip", GenerationSettings,
    ("gen_length", "steps", "block_length", "cfg", "remasking", "temperature", "cache", "threshold", "decide_every"),
    ("steps", "block_length"), frozenset({"do_sample", "top_p", "top_k", "num_beams", "repetition_penalty", "min_p"}),
    {"threshold": float},
)
DREAM = DecodingSpec(
    "dream_skip", DreamGenerationSettings,
    ("gen_length", "steps", "alg", "temperature", "top_p", "top_k", "alg_temp", "eps"),
    ("steps",), frozenset({"do_sample", "num_beams", "repetition_penalty", "min_p"}),
    {"top_p": float, "top_k": int},
)
LLADA2 = DecodingSpec(
    "llada2_skip", BlockDiffusionSettings,
    ("gen_length", "block_length", "steps", "threshold", "minimal_topk", "temperature", "top_p", "top_k",
     "eos_early_stop", "cache", "editing_threshold", "max_post_steps", "num_to_transfer"),
    (), frozenset({"do_sample", "num_beams", "repetition_penalty", "min_p"}),
    {"top_p": float, "top_k": int, "editing_threshold": float},
)
# lm-eval's names for the answer length (max_gen_toks and its aliases).
_LENGTH_KEYS = {"max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"}


def resolve_generation(
    gen_kwargs: dict, user: dict[str, Any], spec: DecodingSpec = LLADA, max_length: int | None = None
) -> tuple[Any, list[str], dict[str, str]]:
    """A request's decoding settings, its stop strings, and each setting as "value (source)";
    ``user`` holds the model_args values (None: not given); ``max_length`` (the model's, when known)
    must leave room for a prompt beside the answer."""
    unknown = set(gen_kwargs) - set(spec.keys) - spec.ignored - _LENGTH_KEYS - {"until"}
    if unknown:
        raise ValueError(
            f"generation_kwargs {sorted(unknown)} are not understood by {spec.model}; "
            f"it takes {sorted(spec.keys)} plus until/max_gen_toks"
        )
    normalized = normalize_gen_kwargs(gen_kwargs, default_max_gen_toks=256)
    until = handle_stop_sequences(normalized.get("until"), eos=None)
    task = {k: gen_kwargs[k] for k in spec.keys if k in gen_kwargs}
    if "gen_length" not in task and _LENGTH_KEYS & set(gen_kwargs):
        task["gen_length"] = normalized["max_gen_toks"]
    check_length_change(user, task, spec)
    chosen = choose_settings(user, task)
    gen_length = chosen.setdefault("gen_length", (normalized["max_gen_toks"], "default"))[0]
    for key in spec.from_length:
        chosen.setdefault(key, (gen_length, "default: gen_length"))
    default = spec.settings()
    settings = replace(default, **{k: typed(k, value, spec) for k, (value, _) in chosen.items()})
    origin = {k: f"{getattr(settings, k)} ({source})" for k, (_, source) in chosen.items()}
    try:
        settings.check()
        if max_length is not None and settings.gen_length >= max_length:
            raise ValueError(f"gen_length={settings.gen_length} leaves no room for a prompt within max_length={max_length}; "
                             "choose a shorter gen_length or raise max_length (up to the model's max_sequence_length)")
    except ValueError as err:
        sources = ", ".join(f"{k}={v}" for k, v in origin.items())
        raise ValueError(f"{err} [settings and their sources: {sources}]") from None
    return settings, until, origin


def kwargs_key(gen_kwargs: Mapping[str, Any]) -> str:
    """One string per distinct generation_kwargs (requests of a task carry equal copies)."""
    return json.dumps(gen_kwargs, sort_keys=True, default=str)


def resolve_tasks(
    pairs: Iterable[tuple[str, Mapping[str, Any]]], user: dict[str, Any], spec: DecodingSpec = LLADA,
    max_length: int | None = None,
) -> dict[str, tuple[Any, list[str], dict[str, str]]]:
    """The settings of every (task, generation_kwargs) at once, keyed by ``kwargs_key``, so that a
    task whose settings cannot be honoured fails before any request of any task runs; one error
    names every such task."""
    resolved: dict[str, tuple[Any, list[str], dict[str, str]]] = {}
    failed: dict[str, str] = {}  # kwargs_key -> why
    refused: dict[str, str] = {}  # task -> why
    for task, gen_kwargs in pairs:
        key = kwargs_key(gen_kwargs)
        if key not in resolved and key not in failed:
            try:
                resolved[key] = resolve_generation(dict(gen_kwargs), user, spec, max_length)
            except ValueError as err:
                failed[key] = str(err)
        if key in failed:
            refused.setdefault(task, failed[key])
    if refused:
        listed = "; ".join(f"task {task}: {why}" for task, why in refused.items())
        raise ValueError(f"the generation settings of {len(refused)} task(s) cannot be honoured (judged before any "
                         f"request ran): {listed}")
    return resolved


def generation_tasks(task_dict: Mapping[Any, Any]) -> list[tuple[str, dict]]:
    """(name, generation_kwargs) of every generation task of what lm-eval's ``evaluate`` receives:
    ``TaskManager.load``'s {"tasks": {name: Task}, ...} or the older nested {name: Task | dict}.
    A task's requests carry copies of its ``config.generation_kwargs`` (after ``--gen_kwargs``)."""
    tasks = task_dict["tasks"] if isinstance(task_dict.get("tasks"), Mapping) else task_dict
    found = []
    for name, task in tasks.items():
        if isinstance(task, Mapping):
            found += generation_tasks(task)
        elif getattr(task, "OUTPUT_TYPE", None) == "generate_until":
            found.append((str(name), dict(getattr(task.config, "generation_kwargs", None) or {})))
    return found


def choose_settings(user: dict[str, Any], task: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    """Each setting either source gives, as (value, source): the user's model_args (typed for this
    run) where given, else the task's generation_kwargs. The one precedence rule for every key."""
    chosen = {}
    for key in dict.fromkeys([*user, *task]):
        if user.get(key) is not None:
            replaced = f", over the task's {task[key]}" if key in task and task[key] != user[key] else ""
            chosen[key] = (user[key], f"model_args{replaced}")
        elif key in task:
            chosen[key] = (task[key], "task")
    return chosen


def check_length_change(user: dict[str, Any], task: dict[str, Any], spec: DecodingSpec = LLADA) -> None:
    """Refuse a model_args gen_length other than the task's while the task's steps/block_length (set
    for its own length) would still apply: gen_length=1024 on a task of 256 steps in one block of 256
    would silently decode 4 blocks of 64 steps."""
    if user.get("gen_length") is None or task.get("gen_length") in (None, user["gen_length"]):
        return
    inherited = [f"{k}={task[k]}" for k in spec.from_length if k in task and user.get(k) is None]
    if inherited:
        raise ValueError(
            f"gen_length={user['gen_length']} (model_args) replaces the task's {task['gen_length']}, but the task's "
            f"{', '.join(inherited)} were set for {task['gen_length']} tokens; give {' and '.join(spec.from_length)} in "
            "model_args too (e.g. steps=gen_length), or use a task made for that length"
        )


def setting_type(key: str, spec: DecodingSpec = LLADA) -> type:
    """The type of a decoding setting's field (int, float, str)."""
    return spec.types.get(key, type(getattr(spec.settings, key)))


def typed(key: str, value: Any, spec: DecodingSpec = LLADA) -> Any:
    """A decoding setting converted to the type of its settings field."""
    kind = setting_type(key, spec)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}={value!r} must be of type {kind.__name__}") from None


def check_user_settings(user: dict[str, Any], spec: DecodingSpec = LLADA) -> None:
    """Refuse decoding model_args that no task could make valid, before anything is loaded.

    With ``gen_length`` given, the lengths are judged as a task would see them: a length left out
    is taken as ``gen_length``, the value a task can always give (one block; as many steps as
    tokens), so only what the user fixed fails (``gen_length=8,block_length=3``). Without
    ``gen_length`` every task's own length can still make them fit: judged per task."""
    lengths = ("gen_length", *spec.from_length)
    for key in lengths:
        value = user.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{key}={value!r} must be a positive integer")
    given = {k: typed(k, v, spec) for k, v in user.items() if v is not None and k not in lengths}
    replace(spec.settings(), **given).check()
    if user.get("gen_length") is None:
        return
    fixed = {k: user[k] for k in lengths if user.get(k) is not None}
    try:
        replace(spec.settings(), **given, **{k: fixed.get(k, user["gen_length"]) for k in lengths}).check()
    except ValueError as err:
        named = ", ".join(f"{k}={v}" for k, v in fixed.items())
        raise ValueError(f"{err} ({named} given in model_args, which no task's settings replace)") from None
