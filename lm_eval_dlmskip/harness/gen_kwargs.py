"""Which decoding settings a generation request gets: one precedence rule for every key.

A value the user gave in ``model_args`` wins (typed for this run); the task's ``generation_kwargs``
fill what ``model_args`` leave out; then ``gen_length`` defaults to the task's ``max_gen_toks``,
``steps`` and ``block_length`` to ``gen_length``, the rest to the settings class's defaults. A
model family names its settings class and keys in a ``DecodingSpec`` (LLaDA's, Dream's).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

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
    gen_kwargs: dict, user: dict[str, Any], spec: DecodingSpec = LLADA
) -> tuple[Any, list[str], dict[str, str]]:
    """A request's decoding settings, its stop strings, and each setting as "value (source)";
    ``user`` holds the model_args values (None: not given)."""
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


def typed(key: str, value: Any, spec: DecodingSpec = LLADA) -> Any:
    """A decoding setting converted to the type of its settings field."""
    kind = spec.types.get(key, type(getattr(spec.settings, key)))
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}={value!r} must be of type {kind.__name__}") from None


def check_user_settings(user: dict[str, Any], spec: DecodingSpec = LLADA) -> None:
    """Refuse decoding model_args that no task could make valid, before anything is loaded (how
    the lengths fit together is checked per task, against the task's own)."""
    lengths = ("gen_length", *spec.from_length)
    for key in lengths:
        value = user.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{key}={value!r} must be a positive integer")
    given = {k: typed(k, v, spec) for k, v in user.items() if v is not None and k not in lengths}
    replace(spec.settings(), **given).check()
