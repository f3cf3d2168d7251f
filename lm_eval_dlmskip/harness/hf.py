"""``lm_eval --model hf_skip``: lm-eval's own HF causal LM with decoder layers skipped.

Everything but skipping and FLOPs is lm-eval's ``HFLM``: loading, tokenization, batching,
loglikelihood, rolling windows, generate_until. This class adds the skip model_args (the forms
and 0-based numbering of ``llada_skip``), puts the decoder layers behind a ``LayerSchedule``
(models/hf_layers.py), and charges every forward the model runs to its task with skipping/flops.py's
formulas.
The papers' autoregressive baseline (Qwen2.5-7B with layers skipped) is
``lm_eval --model hf_skip --model_args pretrained=Qwen/Qwen2.5-7B,skip_layers=[4,6,8]``.

FLOPs count what the forwards compute: a loglikelihood forward over the whole (padded) input
with the LM head at every position; a generation's prefill, then one token per step attending
to the cached keys, for every row of the batch until ``generate`` returns (rows that finished
early keep computing while their batch runs, as in HFLM; at batch_size=1 it is each request's
own cost). Likewise a layer that some rows of a batch skip (random draws differ by row) runs for
every row, the skipping rows discarding its output: FLOPs charge it to every row, while the
papers' figure (executed layers per row) counts each row's draw. Random skipping saves compute
only at batch_size=1 (or where rows agree).
"""

from __future__ import annotations

import difflib
import logging
from typing import Any, Mapping

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import CacheHook
from lm_eval.models.huggingface import HFLM

from ..common.errors import ArgumentError, argument_errors
from ..common.families import FAMILIES
from ..models.config import diffusion_family
from ..models.hf_layers import HFShape, LayerSchedule, find_layers, flops_model, install_skipping, weights_fingerprint
from ..skipping.flops import FlopsMeter, TaskTotals
from ..skipping.policies import NO_SKIP, SkipPolicy, SkipTrace, StaticSkip
from ..skipping.profiles import load_profile
from .answer_cache import claim
from .flops_table import TableAtExit, format_flops_table, log_task_flops
from .model_args import SkipArgs, cli_integer
from .skip_method import build_policy, describe_policy

log = logging.getLogger("lm_eval.hf_skip")  # under lm-eval's logger, so its CLI shows our lines

SKIP_ARGS = ("skip_layers", "skip_random", "skip_profile", "skip_k", "seed", "allow_mismatch")
# HFLM arguments that place or batch the model but never change an answer (left out of --use_cache's key)
SPEED_ARGS = frozenset({"batch_size", "max_batch_size", "device", "parallelize", "device_map", "max_memory_per_gpu",
                        "max_cpu_memory", "offload_folder"})


class HFSkipLM(HFLM):
    """An HF causal LM in lm-eval with decoder layers skipped: a static list, a skip profile made
    by ``dlmskip calibrate`` on the same model, or k random layers per request.

    Layer indices in ``skip_layers`` are 0-based (the papers number layers 1..N). Every other
    model_args key is HFLM's (``pretrained``, ``dtype``, ``batch_size``, ``peft``, ...).
    """

    def __init__(
        self,
        pretrained: str,
        skip_layers: list[int] | int | str | None = None,
        skip_random: int | None = None,
        skip_profile: str | None = None,
        skip_k: int | None = None,
        seed: int = 1234,
        allow_mismatch: bool = False,
        **hf_args: Any,
    ) -> None:
        skip_keys = {"skip_layers": skip_layers, "skip_random": skip_random, "skip_profile": skip_profile,
                     "skip_k": skip_k, "seed": seed, "allow_mismatch": allow_mismatch}
        skip_args, shape, policy = self.check_arguments({"pretrained": pretrained, **skip_keys, **hf_args})
        super().__init__(pretrained=pretrained, **hf_args)
        if self.backend != "causal":
            raise ArgumentError("hf_skip", f"{pretrained!r} is a {self.backend} model; hf_skip skips layers of causal LMs")
        self.fingerprint = weights_fingerprint(self.model)
        skip = describe_policy(policy)
        if skip_profile is not None:
            with argument_errors("hf_skip"):  # a profile made on other weights
                layers, profile = load_profile(skip_profile, shape, self.fingerprint, skip_args.allow_mismatch,
                                               skip_args.skip_k)
            policy = StaticSkip(layers) if layers else NO_SKIP
            skip = {**describe_policy(policy), "skip_profile": str(skip_profile), "threshold": profile["threshold"]}
        layers = find_layers(self.model)
        if len(layers) != shape.n_layers:
            raise ValueError(f"hf_skip: {type(self.model).__name__} has {len(layers)} decoder layers, its config "
                             f"num_hidden_layers={shape.n_layers}")
        self.meter = FlopsMeter(flops_model(self.model, layers), self.device)
        self.schedule = LayerSchedule(policy, shape.n_layers)
        install_skipping(self.model, self.schedule)
        self.model.register_forward_pre_hook(self._charge_forward, with_kwargs=True)
        self.skip_settings = {"pretrained": str(pretrained), "model_type": shape.model_type,
                              "fingerprint": self.fingerprint, "skip": skip, "seed": skip_args.seed}
        self._answers_key = {k: str(v) for k, v in hf_args.items() if k not in SPEED_ARGS}
        self._cached = None  # lm-eval's answer cache (--use_cache), noting the answers it serves
        self._task_row: torch.Tensor | None = None  # the meter index of the task being run; None: not charged
        self._unmerged: list[dict[str, TaskTotals]] = []  # this rank's FLOPs since the last merge
        self._table = TableAtExit()
        log.info("hf_skip: %s skipping %s (0-based layers, of %d)", pretrained, skip, shape.n_layers)

    @classmethod
    def check_arguments(cls, model_args: Mapping[str, Any]) -> tuple[SkipArgs, HFShape, SkipPolicy]:
        """Every check before the weights load (``dlmskip check`` and the ``lm_eval`` command line run
        it before lm-eval indexes its tasks): the skip model_args by llada_skip's rules, a LLaDA or
        Dream checkpoint refused with the model to use, the layer range, a skip profile's shape."""
        hf_args = dict(model_args)
        pretrained = hf_args.pop("pretrained", None)
        skip = {key: hf_args.pop(key, None) for key in SKIP_ARGS}
        with argument_errors("hf_skip"):
            if pretrained is None:
                raise ValueError("hf_skip: model_args need pretrained=<hub id or checkpoint directory>")
            skip_args = parse_skip_args(skip, hf_args)
            shape = HFShape.of(_config(pretrained, hf_args))  # ranges and profile shapes, before the weights
            if skip_args.skip_profile is not None:  # the file, its family, shape and skip_k; the weights once loaded
                load_profile(skip_args.skip_profile, shape, "", True, skip_args.skip_k)
            return skip_args, shape, build_policy(shape.n_layers, skip_args)

    # ---- model calls: decide once per call, charge every forward ------------------------------
    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        # lm-eval right-pads a loglikelihood batch with token 0: a row's request is its tokens up to
        # its last non-zero one (the same tokens in any batch, so random draws do not depend on it)
        real = (inps != 0).long().flip(1).cummax(1).values.flip(1)
        self.schedule.begin(inps, real)
        return super()._model_call(inps, attn_mask, labels)

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs):
        self.schedule.begin(context, generation_kwargs["attention_mask"])  # one draw per prompt, every step
        return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def _detect_batch_size(self, requests=None, pos: int = 0):
        task_row, self._task_row = self._task_row, None  # probing forwards are no request's cost
        try:
            return super()._detect_batch_size(requests, pos)
        finally:
            self._task_row = task_row

    def _charge_forward(self, module, args, kwargs) -> None:
        """Forward pre-hook: charge the forward about to run to the current task. Its rows compute
        ``q`` new tokens attending to the cached ones too; the LM head runs where logits are kept."""
        if self._task_row is None:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        B, q = ids.shape
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        keep = kwargs.get("logits_to_keep", 0)
        head = min(keep, q) if isinstance(keep, int) and keep > 0 else q
        full = torch.full((B,), q, device=self.device)
        trace = SkipTrace(self.schedule.executed, full, torch.full_like(full, head), torch.zeros_like(full),
                          keys=torch.full_like(full, past + q), computed=self.schedule.computed)
        self.meter.record(trace, self._task_row.expand(B))

    # ---- requests: lm-eval's methods, once per task so forwards are charged to it ------------
    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._per_task("loglikelihood", super().loglikelihood, requests, disable_tqdm)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        return self._per_task("loglikelihood_rolling", super().loglikelihood_rolling, requests, disable_tqdm)

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        return self._per_task("generate_until", super().generate_until, requests, disable_tqdm)

    def _per_task(self, kind: str, run, requests: list[Instance], disable_tqdm: bool) -> list:
        """``run`` (lm-eval's method) on each task's requests in turn; results in request order."""
        tasks = [str(req.task_name) for req in requests]
        results: list = [None] * len(requests)
        for task, index in self.meter.start(tasks).items():
            mine = [i for i, t in enumerate(tasks) if t == task]
            self._task_row = torch.tensor([index], device=self.device)
            try:
                answers = run([requests[i] for i in mine], disable_tqdm=disable_tqdm)
            finally:
                self._task_row = None
            for i, answer in zip(mine, answers, strict=True):
                results[i] = answer
        added = self.meter.flush()
        if self.world_size > 1:
            self._unmerged.append(added)
        else:
            log_task_flops(log, self.meter, kind, added, "hf_skip", self.schedule.n_layers, "layers run", self.rank)
        return results

    def set_cache_hook(self, cache_hook: CacheHook) -> None:
        """--use_cache: refuse a cache written with other settings (lm-eval keys answers by the
        request alone, so another skip set's answers would be served as this one's)."""
        if cache_hook.dbdict is not None:
            identity = {**self.skip_settings, "dtype": str(self.model.dtype), "hf_args": self._answers_key}
            self._cached = claim(cache_hook.dbdict, identity, "hf_skip")
        super().set_cache_hook(cache_hook)

    def barrier(self) -> None:
        """lm-eval calls this on every rank after each request type: merge the ranks' FLOPs here."""
        if self.world_size > 1:
            mine, self._unmerged = self._unmerged, []
            gathered = self.gather_object(mine)
            if self.rank == 0:
                log_task_flops(log, self.meter, "all ranks", self.meter.merge_ranks(gathered), "hf_skip",
                               self.schedule.n_layers, "layers run", self.rank)
        super().barrier()

    def get_model_info(self) -> dict:
        flops = self.meter.summary()
        served = len(self._cached.served) if self._cached is not None else 0
        if served:
            log.warning("hf_skip: %d answers came from --use_cache; the FLOPs per task count only the answers "
                        "computed in this run", served)
        self._table.show(format_flops_table(flops, self.schedule.n_layers, "hf_skip"))
        return {**super().get_model_info(), "dlmskip": {**self.skip_settings, "n_layers": self.schedule.n_layers,
                                                        "flops": flops, "answers_served_by_use_cache": served}}

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """Parse as the ``lm_eval`` command line does, so ``skip_layers=[4,6,8]`` stays one list."""
        from lm_eval._cli.utils import key_val_to_dict

        return cls.create_from_arg_obj(key_val_to_dict(arg_string), additional_config)


def _config(pretrained, hf_args: dict):
    """The model's config, read before its weights (HFLM's own arguments say where it is); a LLaDA
    or Dream checkpoint is refused with the model that runs it (transformers knows neither)."""
    if not isinstance(pretrained, str):  # a model object passed from Python
        return pretrained.config
    from transformers import AutoConfig, PretrainedConfig

    where = {"revision": str(hf_args.get("revision") or "main"), "subfolder": hf_args.get("subfolder", "")}
    try:
        raw, _ = PretrainedConfig.get_config_dict(pretrained, **where)
    except OSError:  # not found: AutoConfig below says so in its own words
        raw = {}
    family = diffusion_family(raw)
    if family is not None:
        raise ValueError(f"hf_skip: {pretrained} is a {FAMILIES[family]} checkpoint (model_type={raw.get('model_type')!r}), "
                         f"a diffusion LM: use --model {family}_skip")
    return AutoConfig.from_pretrained(pretrained, trust_remote_code=bool(hf_args.get("trust_remote_code")), **where)


def parse_skip_args(skip: Mapping[str, Any], hf_args: Mapping[str, Any]) -> SkipArgs:
    """The skip model_args (``SKIP_ARGS``, None: not given), judged by llada_skip's rules (two
    methods, skip_k alone, a list that is not one, a profile that is none), after refusing a
    misspelt skip key among the other keys (which go to HFLM and from_pretrained)."""
    for key in hf_args:
        close = difflib.get_close_matches(key, SKIP_ARGS, n=1, cutoff=0.75)
        if close or key.startswith("skip"):
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"hf_skip: unknown model_args key {key!r}.{hint} Its skip keys: {', '.join(SKIP_ARGS)}")
    given = {key: cli_integer(value) for key, value in skip.items() if value is not None}
    return SkipArgs.parse({"seed": 1234, "allow_mismatch": False, **given})
