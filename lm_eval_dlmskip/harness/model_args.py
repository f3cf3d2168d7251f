"""``model_args`` parsed and judged once, at the boundary, into the typed settings the rest of the
code receives (``ModelArgs``). Everything that needs no model is refused here, before anything is
loaded: a typo or a contradiction fails in milliseconds, not after lm-eval's start-up and a
checkpoint load. What needs the model (the range of block indices, a router's or profile's fit to
the weights) is checked right after the load (skip_method.py)."""

from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Protocol

import torch

from ..common.errors import argument_errors
from ..decoding.likelihood import LikelihoodSettings
from ..models.loading import check_dtype, local_adapter, local_directory
from ..models.placement import STRATEGIES, gpu_memory
from ..skipping.policies import check_layers
from ..skipping.profiles import profile_blocks, read_profile
from ..skipping.router_checkpoints import resolve_router
from .gen_kwargs import DecodingSpec, check_user_settings, setting_type

SKIP_METHODS = ("skip_layers", "skip_random", "skip_profile", "router")
SWITCHES = ("check_greedy", "allow_mismatch", "compile", "cuda_graphs", "trust_remote_code", "parallelize")
# The model_args of every diffusion family and their defaults (decoding keys are the family's own).
COMMON: dict[str, Any] = {
    "revision": "main", "tokenizer": None, "dtype": "auto", "device": None, "batch_size": 1, "max_batch_size": 64,
    "max_length": None, "mc_num": 128, "mc_batch": 16, "check_greedy": False, "skip_layers": None,
    "skip_random": None, "skip_profile": None, "skip_k": None, "router": None, "router_tau": None,
    "allow_mismatch": False, "seed": 1234, "mc_seed": 1234, "compile": None, "cuda_graphs": True, "peft": None,
    "trust_remote_code": False,  # accepted from lm-eval's --trust_remote_code; no hub code ever runs
    # one model split over the GPUs of the host (lm-eval's HF model's names and meaning)
    "parallelize": False, "device_map": "auto", "max_memory_per_gpu": None, "max_cpu_memory": None,
}
# The integer model_args of every family besides its decoding lengths (lm-eval's CLI reads -1 as -1.0).
INTEGERS = ("batch_size", "max_batch_size", "max_length", "mc_num", "mc_batch", "skip_random", "skip_k", "seed", "mc_seed")


class Family(Protocol):
    """What a model family's harness class tells the parser (``LLaDASkipLM``, ``DreamSkipLM``)."""

    decoding: DecodingSpec
    extra_args: dict[str, Any]  # model_args only this family takes, with their defaults

    @classmethod
    def likelihood_settings(cls, args: Mapping[str, Any]) -> LikelihoodSettings: ...

    @classmethod
    def check_family_args(cls, args: Mapping[str, Any]) -> None: ...


@dataclass(frozen=True)
class SkipArgs:
    """The skipping method the model_args name (at most one) and its companions, well formed;
    ``skip_method.skip_policy`` makes it a policy for the loaded model."""

    skip_layers: tuple[int, ...] | None = None
    skip_random: int | None = None
    skip_profile: str | None = None
    skip_k: int | None = None
    router: str | None = None
    router_tau: float | None = None
    allow_mismatch: bool = False
    seed: int = 1234

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> "SkipArgs":
        """From model_args values (None: not given); refuses what is malformed or contradictory."""
        check_skipping(args)
        layers = args.get("skip_layers")
        return cls(
            skip_layers=None if layers is None else tuple(parse_layers(layers, "skip_layers")),
            skip_random=args.get("skip_random"),
            skip_profile=None if args.get("skip_profile") is None else str(args["skip_profile"]),
            skip_k=args.get("skip_k"),
            router=None if args.get("router") is None else str(args["router"]),
            router_tau=args.get("router_tau"),
            allow_mismatch=bool(args.get("allow_mismatch", False)),
            seed=int(args.get("seed", 1234)),
        )


@dataclass(frozen=True)
class Parallel:
    """``parallelize=True``: whole blocks spread over the visible GPUs (and the CPU when
    ``max_cpu_memory`` is given), as lm-eval's HF model spreads its layers."""

    device_map: str = "auto"
    max_memory_per_gpu: int | str | None = None
    max_cpu_memory: int | str | None = None

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> "Parallel | None":
        if args.get("device_map", "auto") not in STRATEGIES:
            raise ValueError(f"device_map={args['device_map']!r}: use one of {', '.join(STRATEGIES)}")
        if not args.get("parallelize"):
            for key in ("max_memory_per_gpu", "max_cpu_memory"):
                if args.get(key) is not None:
                    raise ValueError(f"{key}={args[key]!r} only applies with parallelize=True; add it or drop {key}")
            return None
        for key in ("max_memory_per_gpu", "max_cpu_memory"):
            value = args.get(key)
            if value is not None and (isinstance(value, bool) or not _memory_size(value)):
                raise ValueError(f"{key}={value!r} is not an amount of memory; write bytes or e.g. 20GiB, 500MB")
        return cls(args.get("device_map", "auto"), args.get("max_memory_per_gpu"), args.get("max_cpu_memory"))

    def max_memory(self) -> dict[int | str, int | str]:
        """accelerate's budget: every visible GPU (``max_memory_per_gpu`` each, or what it has free),
        and the CPU when ``max_cpu_memory`` is given."""
        budget = gpu_memory(self.max_memory_per_gpu)
        if self.max_cpu_memory is not None:
            budget["cpu"] = self.max_cpu_memory
        if not budget:
            raise ValueError("parallelize=True found no GPU to place blocks on; give max_cpu_memory to place them on "
                             "the CPU, or drop parallelize")
        return budget


def _memory_size(value: int | str) -> bool:
    from accelerate.utils import convert_file_size_to_int

    try:
        return convert_file_size_to_int(value) > 0
    except (ValueError, TypeError):
        return False


@dataclass(frozen=True)
class ModelArgs:
    """A diffusion family's model_args, parsed and checked: what to load, how to batch, the
    likelihood and the decoding settings the user gave, and how to skip."""

    pretrained: str
    revision: str
    tokenizer: str | None
    dtype: str
    device: str | None
    batch_size: str  # "8", "auto" or "auto:N"
    max_batch_size: int
    max_length: int | None
    peft: str | None
    seed: int  # random skipping and sampled decoding
    mc_seed: int  # the Monte-Carlo masks alone
    check_greedy: bool
    compile: bool | None  # None: on a GPU, off on a CPU
    cuda_graphs: bool
    trust_remote_code: bool
    parallel: Parallel | None  # parallelize=True: how to split the model over devices
    likelihood: LikelihoodSettings
    decoding: dict[str, Any]  # the decoding model_args as given (None: not given), keyed as the family's spec
    skip: SkipArgs

    def described(self, fingerprint: str, skip: dict, compiled: bool, max_length: int) -> dict:
        """The settings the results record (``config.dlmskip``), with what loading decided: the
        weights' fingerprint, the skip method as run, compile on or off, the max_length used."""
        return {
            "pretrained": self.pretrained, "revision": self.revision, "peft": self.peft, "fingerprint": fingerprint,
            "skip": skip, "likelihood": asdict(self.likelihood), "check_greedy": self.check_greedy,
            "generation": dict(self.decoding), "seed": self.seed, "mc_seed": self.mc_seed, "compile": compiled,
            "cuda_graphs": self.cuda_graphs, "max_length": max_length,
            "parallelize": None if self.parallel is None else asdict(self.parallel),
        }


def parse_model_args(given: Mapping[str, Any], family: type[Family]) -> ModelArgs:
    """``given`` (lm-eval's keyword arguments) as ``ModelArgs``: an unknown key is named with the
    closest known one, and every value that needs no model is judged; what is refused is an
    ``ArgumentError`` of the family's model."""
    with argument_errors(family.decoding.model):
        return _parse(given, family)


def _parse(given: Mapping[str, Any], family: type[Family]) -> ModelArgs:
    spec = family.decoding
    defaults = {"pretrained": None, **COMMON, **{key: None for key in spec.keys}, **family.extra_args}
    check_known(given, defaults, spec.model)
    integers = [*INTEGERS, *(k for k in spec.keys if setting_type(k, spec) is int)]
    args = {**defaults, **{k: cli_integer(v) if k in integers else v for k, v in given.items()}}
    family.check_family_args(args)
    decoding = {key: args[key] for key in spec.keys}
    check_user_settings(decoding, spec)
    likelihood = family.likelihood_settings(args)
    likelihood.check()
    check_sources(args)
    check_runtime(args)
    return ModelArgs(
        pretrained=str(args["pretrained"]), revision=str(args["revision"]),
        tokenizer=None if args["tokenizer"] is None else str(args["tokenizer"]), dtype=args["dtype"],
        device=args["device"], batch_size=str(args["batch_size"]), max_batch_size=args["max_batch_size"] or 64,
        max_length=args["max_length"], peft=args["peft"], seed=int(args["seed"]), mc_seed=int(args["mc_seed"]),
        check_greedy=bool(args["check_greedy"]), compile=None if args["compile"] is None else bool(args["compile"]), cuda_graphs=bool(args["cuda_graphs"]),
        trust_remote_code=bool(args["trust_remote_code"]), parallel=Parallel.parse(args), likelihood=likelihood,
        decoding=decoding,
        skip=SkipArgs.parse(args),
    )


def check_known(given: Mapping[str, Any], known: Mapping[str, Any], model: str) -> None:
    """Name an unknown model_args key and suggest the closest known one."""
    if given.get("pretrained") is None:
        raise ValueError(f"{model}: model_args need pretrained=<hub id or checkpoint directory>")
    for key in given:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{model}: unknown model_args key {key!r}.{hint} Known keys: {', '.join(sorted(known))}")


def check_sources(args: Mapping[str, Any]) -> None:
    """Local paths exist (a hub id is only looked up when loading); the revision is a name."""
    revision = args.get("revision", "main")
    if isinstance(revision, bool) or not isinstance(revision, (str, int)) or not str(revision).strip():
        raise ValueError(
            f"revision={revision!r}: give a branch, tag or commit hash of the hub repository (default main); a "
            "commit prefix that lm-eval reads as a number other than an integer cannot be recovered, give the full hash"
        )
    local_directory(str(args["pretrained"]), "pretrained")
    if args.get("tokenizer") is not None:
        local_directory(str(args["tokenizer"]), "tokenizer")
    if args.get("peft") is not None:
        local_adapter(str(args["peft"]))


def check_runtime(args: Mapping[str, Any]) -> None:
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
        if not (isinstance(value, bool) or value in (0, 1) or key == "compile" and value is None):
            raise ValueError(f"{key}={value!r} must be True or False")


def check_batch_size(batch_size: int | str) -> None:
    """A positive integer, ``auto`` or ``auto:N`` (lm-eval's forms)."""
    text = str(batch_size)
    number = text.removeprefix("auto:") if text.startswith("auto:") else text
    if text != "auto" and not (number.isdigit() and int(number) >= 1):
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer or 'auto'")


def check_skipping(args: Mapping[str, Any]) -> None:
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


def cli_integer(value: Any) -> Any:
    """A negative whole number as the integer the user typed: lm-eval's command line reads
    ``mc_num=-1`` as -1.0 (only unsigned digits become ints there), which would then be echoed
    and judged as a float. Every other value is returned as it came."""
    if isinstance(value, float) and value < 0 and value.is_integer():
        return int(value)
    return value


def _int_at_least(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum
