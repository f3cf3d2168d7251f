"""The skipping method of the model_args made into a policy for the loaded model: a static list, a
skip profile's first k choices, k random blocks per forward, or trained routers; how the results
describe it; and the FLOPs model that counts its cost. What needs the model (the block range, the
fit of a router or profile to the weights) fails here, right after the load."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..common.resume import resume_command
from ..skipping.flops import FlopsModel
from ..skipping.policies import NO_SKIP, RandomSkip, SkipPolicy, StaticSkip, check_layers
from ..skipping.profiles import load_profile
from ..skipping.router_checkpoints import RouterCheckpoint, load_routers
from ..skipping.routers import RoutedSkip
from .model_args import SkipArgs


@dataclass(frozen=True)
class SkipMethod:
    policy: SkipPolicy
    description: dict[str, Any]  # what the results record under config.dlmskip.skip
    flops: FlopsModel
    routers: RouterCheckpoint | None = None  # its LoRA adapter, if any, is the harness's to merge


def skip_method(
    skip: SkipArgs, cfg: Any, fingerprint: str, tokenizer: str, device: torch.device, dtype: torch.dtype,
    compile: bool = False, block_devices: tuple[torch.device, ...] | None = None,
) -> SkipMethod:
    """The policy ``skip`` names for a model of config ``cfg``, weights ``fingerprint`` and
    tokenizer fingerprint ``tokenizer`` (a router or profile made on another is refused); a
    model split over devices (``block_devices``) has each router beside its block."""
    if skip.router is not None:
        routed = load_routers(skip.router, cfg, fingerprint, skip.router_tau, skip.allow_mismatch, device, dtype, tokenizer)
        for router, block_device in zip(routed.routers.routers, block_devices or ()):
            router.to(block_device)
        policy = RoutedSkip(routed.routers, routed.routers.cfg.tau)
        flops = FlopsModel.of(cfg, routed.routers.cfg.hidden, routed.routers.cfg.depth)
        return SkipMethod(policy.compiled() if compile else policy, describe_router(routed), flops, routed)
    if skip.skip_profile is not None:
        layers, profile = load_profile(skip.skip_profile, cfg, fingerprint, skip.allow_mismatch, skip.skip_k, tokenizer)
        policy = StaticSkip(layers) if layers else NO_SKIP
        description = {**describe_policy(policy), "skip_profile": skip.skip_profile, "threshold": profile["threshold"]}
        return SkipMethod(policy, description, FlopsModel.of(cfg))
    policy = build_policy(cfg.n_layers, skip)
    return SkipMethod(policy, describe_policy(policy), FlopsModel.of(cfg))


def build_policy(n_layers: int, skip: SkipArgs) -> SkipPolicy:
    """The static or random skip policy the model_args ask for, checked against ``n_layers``."""
    if skip.skip_layers is not None:
        check_layers(skip.skip_layers, n_layers, "skip_layers")
        return StaticSkip(skip.skip_layers) if skip.skip_layers else NO_SKIP
    if skip.skip_random is not None:
        policy = RandomSkip(skip.skip_random, n_layers, skip.seed)
        policy.check(n_layers)
        return policy
    return NO_SKIP


def describe_policy(policy: SkipPolicy) -> dict:
    if isinstance(policy, StaticSkip):
        return {"method": "static", "skip_layers": sorted(policy.layers), "k": len(policy.layers)}
    if isinstance(policy, RandomSkip):
        return {"method": "random", "k": policy.k, "seed": policy.seed}
    return {"method": "none"}


def describe_router(routed: RouterCheckpoint) -> dict:
    meta = routed.meta
    return {
        "method": "routed",
        "router": str(routed.path),
        "tau": routed.routers.cfg.tau,
        **{k: meta.get(k) for k in ("lambda", "alpha_target", "mask_scaling", "target_ratio")},
        "router_shape": meta["router"],
        "trained_on": meta.get("training", {}).get("source"),
        "trained_for": meta["base_model"]["name"],
        # A checkpoint saved mid-training scores as a partly trained router.
        "completed_steps": meta.get("training", {}).get("completed_steps"),
        "training_steps": meta.get("training", {}).get("steps"),
        "finished": meta.get("training", {}).get("finished"),
    }


def warn_if_unfinished(routed: RouterCheckpoint, logger: logging.Logger) -> None:
    """One warning line when the router was saved mid-training, with the command that finishes it."""
    training = routed.meta.get("training", {})
    if training.get("finished") is False:
        logger.warning("router=%s was saved mid-training: it stopped at step %s of %s, so these results are a partly "
                       "trained router's; finish it with: %s", routed.path, training.get("completed_steps"),
                       training.get("steps"), resume_command(routed.path.resolve()))
