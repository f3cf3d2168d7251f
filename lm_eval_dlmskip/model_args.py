"""``model_args`` judged before anything is loaded: a typo or a contradiction fails in milliseconds,
not after lm-eval's start-up and a checkpoint load. What needs the model (the range of block
indices, a router's or profile's fit to the weights) is checked right after the load."""

from __future__ import annotations

import json
from typing import Any

import torch

from .loading import check_dtype, local_adapter, local_directory
from .policies import check_layers
from .report.calibrate import profile_blocks, read_profile
from .router import resolve_router

SKIP_METHODS = ("skip_layers", "skip_random", "skip_profile", "router")
SWITCHES = ("check_greedy", "allow_mismatch", "compile", "cuda_graphs")


def check_before_loading(args: dict[str, Any]) -> None:
    """Refuse every ``model_args`` value that can be judged without the model; ``args`` maps the
    harness's parameter names to their values (None: not given). Decoding and Monte-Carlo settings
    are checked by their own settings classes."""
    check_sources(args)
    check_runtime(args)
    check_skipping(args)


def check_sources(args: dict[str, Any]) -> None:
    """Local paths exist (a hub id is only looked up when loading)."""
    local_directory(str(args["pretrained"]), "pretrained")
    if args.get("tokenizer") is not None:
        local_directory(str(args["tokenizer"]), "tokenizer")
    if args.get("peft") is not None:
        local_adapter(str(args["peft"]))


def check_runtime(args: dict[str, Any]) -> None:
    """dtype, device, batch sizes, lengths, seeds and on/off switches."""
    check_dtype(args.get("dtype", "auto"))
    device = args.get("device")
    if device is not None:
        try:
            torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device={device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    check_batch_size(args.get("batch_size", 1))
    for key in ("max_batch_size", "max_length"):
        value = args.get(key)
        if value is not None and not _int_at_least(value, 1):
            raise ValueError(f"{key}={value!r} must be a positive integer (or left out)")
    for key in ("seed", "mc_seed"):
        value = args.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}={value!r} must be an integer")
    for key in SWITCHES:
        value = args.get(key, False)
        if not (isinstance(value, bool) or value in (0, 1)):
            raise ValueError(f"{key}={value!r} must be True or False")


def check_batch_size(batch_size: int | str) -> None:
    """A positive integer, ``auto`` or ``auto:N`` (lm-eval's forms)."""
    text = str(batch_size)
    number = text.removeprefix("auto:") if text.startswith("auto:") else text
    if text != "auto" and not (number.isdigit() and int(number) >= 1):
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer or 'auto'")


def check_skipping(args: dict[str, Any]) -> None:
    """At most one skip method; its companions only with it; block lists, counts and paths well formed."""
    chosen = [name for name in SKIP_METHODS if args.get(name) is not None]
    if len(chosen) > 1:
        raise ValueError(f"{' and '.join(chosen)} both given: choose one way of skipping")
    skip_k, router_tau = args.get("skip_k"), args.get("router_tau")
    if skip_k is not None and args.get("skip_profile") is None:
        raise ValueError("skip_k is given without skip_profile=PATH")
    if router_tau is not None and args.get("router") is None:
        raise ValueError("router_tau is given without router=PATH")
    if args.get("skip_layers") is not None:
        check_layers(parse_layers(args["skip_layers"], "skip_layers"), None, "skip_layers")
    skip_random = args.get("skip_random")
    if skip_random is not None and not _int_at_least(skip_random, 0):
        raise ValueError(f"skip_random={skip_random!r}: give the number of blocks to skip per forward, an integer >= 0")
    if skip_k is not None and not _int_at_least(skip_k, 0):
        raise ValueError(f"skip_k={skip_k!r}: give how many of the profile's blocks to skip, an integer >= 0")
    if args.get("skip_profile") is not None:
        profile_blocks(read_profile(args["skip_profile"]), args["skip_profile"], skip_k)
    if args.get("router") is not None:
        resolve_router(str(args["router"]))
    if router_tau is not None and (isinstance(router_tau, bool) or not isinstance(router_tau, (int, float))
                                   or not 0 <= router_tau < 1):
        raise ValueError(f"router_tau={router_tau!r} must be a number in [0, 1): the share of skip votes above which a block is skipped")


def parse_layers(value: Any, name: str) -> list[Any]:
    """A block list from model_args: ``[4,6,8]`` (a list), one integer, or a JSON list string."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"{name}={value!r}: write a list as {name}=[4,6,8] (0-based block indices)") from None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name}={value!r}: write a list as {name}=[4,6,8] (0-based block indices)")
    return list(value)


def _int_at_least(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum
