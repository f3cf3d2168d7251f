"""Which decoding settings a generation request gets: one precedence rule for every key.

A value the user gave in ``model_args`` wins (typed for this run); the task's ``generation_kwargs``
fill what ``model_args`` leave out; then ``gen_length`` defaults to the task's ``max_gen_toks``,
``steps`` and ``block_length`` to ``gen_length``, the rest to ``GenerationSettings``' defaults.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

from .generation import GenerationSettings

# Decoding settings both model_args and a task's generation_kwargs may set (see choose_settings).
GENERATION_KEYS = ("gen_length", "steps", "block_length", "cfg", "remasking", "temperature", "cache", "threshold",
                   "decide_every")
_TYPES = {"threshold": float}  # settings whose default (None) does not tell their type
# lm-eval's names for the answer length (max_gen_toks and its aliases) and kwargs meaningless here.
_LENGTH_KEYS = {"max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"}
_IGNORED_GEN_KEYS = {"do_sample", "top_p", "top_k", "num_beams", "repetition_penalty", "min_p"}


def resolve_generation(gen_kwargs: dict, user: dict[str, Any]) -> tuple[GenerationSettings, list[str], dict[str, str]]:
    """A request's decoding settings, its stop strings, and each setting as "value (source)";
    ``user`` holds the model_args values (None: not given)."""
    unknown = set(gen_kwargs) - set(GENERATION_KEYS) - _IGNORED_GEN_KEYS - _LENGTH_KEYS - {"until"}
    if unknown:
        raise ValueError(
            f"generation_kwargs {sorted(unknown)} are not understood by llada_skip; "
            f"it takes {sorted(GENERATION_KEYS)} plus until/max_gen_toks"
        )
    normalized = normalize_gen_kwargs(gen_kwargs, default_max_gen_toks=256)
    until = handle_stop_sequences(normalized.get("until"), eos=None)
    task = {k: gen_kwargs[k] for k in GENERATION_KEYS if k in gen_kwargs}
    if "gen_length" not in task and _LENGTH_KEYS & set(gen_kwargs):
        task["gen_length"] = normalized["max_gen_toks"]
    check_length_change(user, task)
    chosen = choose_settings(user, task)
    gen_length = chosen.setdefault("gen_length", (normalized["max_gen_toks"], "default"))[0]
    for key in ("steps", "block_length"):
        chosen.setdefault(key, (gen_length, "default: gen_length"))
    default = GenerationSettings()
    settings = replace(default, **{k: typed(k, value) for k, (value, _) in chosen.items()})
    origin = {k: f"{getattr(settings, k)} ({source})" for k, (_, source) in chosen.items()}
    try:
        settings.check()
    except ValueError as err:
        sources = ", ".join(f"{k}={v}" for k, v in origin.items())
        raise ValueError(f"{err} [settings and their sources: {sources}]") from None
    return settings, until, origin


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


def check_length_change(user: dict[str, Any], task: dict[str, Any]) -> None:
    """Refuse a model_args gen_length other than the task's while the task's steps/block_length (set
    for its own length) would still apply: gen_length=1024 on a task of 256 steps in one block of 256
    would silently decode 4 blocks of 64 steps."""
    if user.get("gen_length") is None or task.get("gen_length") in (None, user["gen_length"]):
        return
    inherited = [f"{k}={task[k]}" for k in ("steps", "block_length") if k in task and user.get(k) is None]
    if inherited:
        raise ValueError(
            f"gen_length={user['gen_length']} (model_args) replaces the task's {task['gen_length']}, but the task's "
            f"{', '.join(inherited)} were set for {task['gen_length']} tokens; give steps and block_length in "
            "model_args too (e.g. steps=gen_length,block_length=gen_length), or use a task made for that length"
        )


def typed(key: str, value: Any) -> Any:
    """A decoding setting converted to the type of its GenerationSettings field."""
    kind = _TYPES.get(key, type(getattr(GenerationSettings, key)))
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}={value!r} must be of type {kind.__name__}") from None


def check_user_settings(user: dict[str, Any]) -> None:
    """Refuse decoding model_args that no task could make valid, before anything is loaded (how
    the lengths fit together is checked per task, against the task's own)."""
    lengths = ("gen_length", "steps", "block_length")
    for key in lengths:
        value = user.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{key}={value!r} must be a positive integer")
    given = {k: typed(k, v) for k, v in user.items() if v is not None and k not in lengths}
    replace(GenerationSettings(), **given).check()
