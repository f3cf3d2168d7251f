"""``lm_eval --model llada_skip``: LLaDA scored and decoded by diffusion, with blocks skipped.

Requests are batched across requests (longest first, generation grouped by gen_kwargs, as lm-eval's
HFLM does), handed to the diffusion algorithms as a ``denoise(ids, attention_mask, logits_at)``
callable, and every forward's skip trace is charged to the request's task. The per-task FLOPs
figures and every skipping and sampling setting come back through ``get_model_info()``, which
lm-eval merges into ``results["config"]``.
"""

from __future__ import annotations

import difflib
import inspect
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import CacheHook, TemplateLM
from lm_eval.models.utils import Collator, postprocess_generated_text
from tqdm import tqdm

from .cache import AnswerCache
from .flops import FlopsMeter, FlopsModel, TableAtExit, TaskTotals, format_flops_table
from .gen_kwargs import LLADA, check_user_settings, resolve_generation
from .generation import GenerationSettings, generate
from .graphs import GraphRunner
from .likelihood import LikelihoodSettings, greedy_matches, mc_loglikelihood, request_generator
from .loading import adapter_fingerprint, load_model, load_tokenizer, merge_lora, tokenizer_fingerprint, with_adapter
from .model_args import check_before_loading, parse_layers
from .policies import NO_SKIP, RandomSkip, SkipPolicy, StaticSkip, check_layers, row_keys
from .report.calibrate import load_profile
from .router import RoutedSkip, RouterCheckpoint, load_routers, router_digest

log = logging.getLogger("lm_eval.llada_skip")  # under lm-eval's logger, so its CLI shows our lines
LM_EVAL_DEFAULT_DEVICE = "cuda:0"  # what lm_eval passes as device when --device is not given



class LLaDASkipLM(TemplateLM):
    """LLaDA in lm-eval: Monte-Carlo likelihood, diffusion generation, static/random skipping.

    Block indices in ``skip_layers`` are 0-based (the papers number blocks 1..32: their k=3 set
    {5,7,9} is ``skip_layers=[4,6,8]``).
    """

    backend = "causal"  # context and continuation are encoded together, then split
    family = "llada"  # the checkpoints this model takes (loading.py refuses the others)
    decoding = LLADA  # its decoding settings and their keys (gen_kwargs.py)

    def __init__(
        self,
        pretrained: str,
        revision: str = "main",
        tokenizer: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = 64,
        max_length: int | None = None,
        mc_num: int = 128,
        mc_batch: int = 16,
        cfg: float | None = None,
        check_greedy: bool = False,
        gen_length: int | None = None,
        steps: int | None = None,
        block_length: int | None = None,
        remasking: str | None = None,
        temperature: float | None = None,
        cache: str | None = None,
        threshold: float | None = None,
        decide_every: str | None = None,
        skip_layers: list[int] | int | str | None = None,
        skip_random: int | None = None,
        skip_profile: str | None = None,
        skip_k: int | None = None,
        router: str | None = None,
        router_tau: float | None = None,
        allow_mismatch: bool = False,
        seed: int = 1234,
        mc_seed: int = 1234,
        compile: bool = False,
        cuda_graphs: bool = True,
        peft: str | None = None,
        trust_remote_code: bool | None = None,
    ) -> None:
        super().__init__()
        # What the user typed for decoding (None: not given, the task or the default decides).
        self.gen_args = self.decoding_args(
            {"gen_length": gen_length, "steps": steps, "block_length": block_length, "cfg": cfg, "remasking": remasking,
             "temperature": temperature, "cache": cache, "threshold": threshold, "decide_every": decide_every}
        )
        # Every argument that needs no model is checked before anything is loaded.
        check_user_settings(self.gen_args, self.decoding)
        self.likelihood = self.likelihood_settings(mc_num, mc_batch, float(cfg or 0.0))
        self.likelihood.check()
        check_before_loading({
            "pretrained": pretrained, "tokenizer": tokenizer, "peft": peft, "dtype": dtype, "device": device,
            "batch_size": batch_size, "max_batch_size": max_batch_size, "max_length": max_length, "seed": seed,
            "mc_seed": mc_seed, "check_greedy": check_greedy, "allow_mismatch": allow_mismatch, "compile": compile,
            "cuda_graphs": cuda_graphs, "skip_layers": skip_layers, "skip_random": skip_random,
            "skip_profile": skip_profile, "skip_k": skip_k, "router": router, "router_tau": router_tau,
        })
        if trust_remote_code:
            log.info("trust_remote_code is not needed: llada_skip runs its own LLaDA code and executes none from the hub")
        self._setup_distributed(device)
        checkpoint = load_model(pretrained, revision=str(revision), dtype=dtype, device=self._device, family=self.family)
        self.checkpoint = checkpoint
        self.model, fingerprint = checkpoint.model, checkpoint.fingerprint
        if peft:  # skip profiles and routers must fit the weights evaluated, adapter merged
            self.model = merge_lora(checkpoint.model, peft, str(revision))
            fingerprint = with_adapter(fingerprint, adapter_fingerprint(peft, str(revision)))
        self.cfg = checkpoint.model.cfg
        self.seed = int(seed)  # random skipping and sampled decoding
        # What needs the model (block range, fit of a router or profile) fails here, before the rest.
        self.policy, skip, flops = self._skip_policy(
            fingerprint, skip_layers, skip_random, skip_profile, skip_k, router, router_tau,
            bool(allow_mismatch), bool(compile),
        )
        if compile:
            self.model.compile_blocks()
        self.tokenizer = load_tokenizer(checkpoint.path if tokenizer is None else tokenizer, self.cfg.mask_token_id)
        self.mask_id = self.cfg.mask_token_id
        self._max_length = max_length or self.cfg.max_sequence_length
        self.batch_size_arg = str(batch_size)
        self.max_batch_size = max_batch_size or 64
        self.mc_seed = int(mc_seed)  # the Monte-Carlo masks alone, so runs that vary `seed` score alike
        self.check_greedy = bool(check_greedy)  # is_greedy for multiple-choice requests too
        self._announced: set[str] = set()  # tasks whose decoding settings were logged
        self.settings = {
            "pretrained": pretrained,
            "revision": str(revision),
            "peft": peft,
            "fingerprint": fingerprint,  # with peft's adapter; a router's own adapter belongs to the router
            "skip": skip,
            "likelihood": asdict(self.likelihood),
            "check_greedy": self.check_greedy,
            "generation": dict(self.gen_args),
            "seed": self.seed,
            "mc_seed": self.mc_seed,
            "compile": bool(compile),
            "cuda_graphs": bool(cuda_graphs),
            "max_length": self._max_length,
        }
        self.meter = FlopsMeter(flops, self._device)
        self.answer_cache: AnswerCache | None = None  # with --use_cache
        self._unmerged: list[dict[str, TaskTotals]] = []  # this rank's FLOPs since the last merge
        self._flops_table = TableAtExit()  # printed at exit under the lm_eval CLI
        # Generation repeats one shape for every denoising step: replay it from CUDA graphs.
        use_graphs = bool(cuda_graphs) and self._device.type == "cuda"
        self.generation_forward = GraphRunner(self.model) if use_graphs else self.model

    def _skip_policy(
        self, fingerprint: str, skip_layers, skip_random, skip_profile, skip_k, router, router_tau,
        allow_mismatch: bool, compile: bool,
    ) -> tuple[SkipPolicy, dict, FlopsModel]:
        """The skipping method the model_args name (``check_before_loading`` allowed at most one),
        how to describe it in the results, and the FLOPs model that counts its cost."""
        if router is not None:
            routed = load_routers(router, self.cfg, fingerprint, router_tau, allow_mismatch, self._device, dtype=self.model.dtype)
            warn_if_unfinished(routed)
            if routed.adapter is not None:
                self.model = merge_lora(self.model, str(routed.adapter))
            policy = RoutedSkip(routed.routers, routed.routers.cfg.tau)
            flops = FlopsModel.of(self.cfg, routed.routers.cfg.hidden, routed.routers.cfg.depth)
            return (policy.compiled() if compile else policy), describe_router(routed), flops
        if skip_profile is not None:
            layers, profile = load_profile(skip_profile, self.cfg, fingerprint, allow_mismatch, skip_k)
            policy = StaticSkip(layers) if layers else NO_SKIP
            skip = {**describe_policy(policy), "skip_profile": str(skip_profile), "threshold": profile["threshold"]}
            return policy, skip, FlopsModel.of(self.cfg)
        policy = build_policy(self.cfg.n_layers, skip_layers, skip_random, self.seed)
        return policy, describe_policy(policy), FlopsModel.of(self.cfg)

    # ---- what a model family changes (DreamSkipLM overrides these) ---------------------------
    def decoding_args(self, given: dict[str, Any]) -> dict[str, Any]:
        """The decoding model_args as given (None: not given), keyed as ``self.decoding.keys``."""
        return given

    def likelihood_settings(self, mc_num: int, mc_batch: int, cfg: float) -> LikelihoodSettings:
        return LikelihoodSettings(mc_num=mc_num, mc_batch=mc_batch, cfg=cfg)

    def likelihood_answer(self, continuation: list[int]) -> list[int]:
        """The tokens scored as the answer of a loglikelihood request."""
        return continuation

    def decode(self, denoise, ids: torch.Tensor, attention_mask: torch.Tensor | None, settings, row_seeds) -> torch.Tensor:
        """The family's diffusion decoding: prompt ids [B, P] -> [B, P + gen_length]."""
        return generate(denoise, ids, attention_mask, settings, self.mask_id, row_seeds)

    # ---- lm-eval conventions -------------------------------------------------------------
    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None):
        check_model_args(arg_dict, cls)
        return super().create_from_arg_obj(arg_dict, additional_config)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """Parse as the ``lm_eval`` command line does, so ``skip_layers=[4,6,8]`` stays one list
        (lm-eval's own string parser for Python callers would split it at every comma)."""
        from lm_eval._cli.utils import key_val_to_dict

        return cls.create_from_arg_obj(key_val_to_dict(arg_string), additional_config)

    def _setup_distributed(self, device: str | None) -> None:
        """Data parallel under ``accelerate launch``: one model per process, requests split by lm-eval."""
        from accelerate import Accelerator

        accelerator = Accelerator()
        self.accelerator = accelerator if accelerator.num_processes > 1 else None
        if self.accelerator is not None:
            self._device = accelerator.device
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes
            return
        wanted = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if wanted.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval passes cuda:0 when --device is not given: that value is no request for a GPU.
            level = logging.INFO if device == LM_EVAL_DEFAULT_DEVICE else logging.WARNING
            log.log(level, "device=%s but CUDA is not available; running on cpu", wanted)
            wanted = "cpu"
        self._device = torch.device(wanted)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """LLaDA's convention: no BOS is added; special tokens written in the text are kept."""
        return self.tokenizer.encode(string, add_special_tokens=False)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.accelerator is None else self.accelerator.gather(tensor)

    def gather_object(self, obj, dst: int = 0):
        if self.world_size == 1:
            return [obj]
        result = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj=obj, object_gather_list=result, dst=dst)
        return result

    def barrier(self) -> None:
        """lm-eval calls this on every rank after each request type, whether or not the rank's
        requests reached the model (--use_cache may have served them all), so the ranks' FLOPs
        merge here: a collective inside loglikelihood or generate_until could wait forever."""
        if self.accelerator is None:
            return
        self._count_served()
        mine, self._unmerged = self._unmerged, []
        gathered = self.gather_object(mine)
        if self.rank == 0:
            self._log_flops("all ranks", self.meter.merge_ranks(gathered))
        self.accelerator.wait_for_everyone()

    def set_cache_hook(self, cache_hook: CacheHook) -> None:
        """--use_cache: refuse a cache written with other settings; keep each answer's FLOPs with it."""
        if cache_hook.dbdict is not None:
            self.answer_cache = AnswerCache(cache_hook.dbdict, self.cache_identity(), self.meter.flops, self._device)
        super().set_cache_hook(cache_hook)

    def cache_identity(self) -> dict:
        """Every setting that can change an answer: the settings but the speed switches (the batch
        layout never changes one), the dtype, max_length (truncation), the tokenizer, and the
        router's weights (a router retrained in place keeps its path)."""
        identity = {k: v for k, v in self.settings.items() if k not in ("compile", "cuda_graphs")}
        identity.update(dtype=str(self.model.dtype), tokenizer=tokenizer_fingerprint(self.tokenizer))
        router = self.settings["skip"].get("router")
        if router is not None:
            identity["router_weights"] = router_digest(Path(router))
        return identity

    def get_model_info(self) -> dict:
        self._count_served()
        flops = self.meter.summary()
        self._flops_table.show(format_flops_table(flops, self.cfg.n_layers, self.decoding.model))
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(self.model.dtype),
            "model_revision": self.settings["revision"],
            "model_sha": self.checkpoint.hub_commit,
            "dlmskip": {**self.settings, "family": self.cfg.family, "n_layers": self.cfg.n_layers, "flops": flops},
        }

    # ---- batching helpers ------------------------------------------------------------------
    def _batch_size(self, rows_per_request: int, seq_len: int) -> int:
        """``batch_size`` as an int; ``auto`` probes the largest request batch that fits in memory."""
        if not self.batch_size_arg.startswith("auto"):
            return int(self.batch_size_arg)  # checked >= 1 before loading
        from accelerate.utils import find_executable_batch_size

        @find_executable_batch_size(starting_batch_size=self.max_batch_size)
        def probe(batch_size: int) -> int:
            ids = torch.full((batch_size * rows_per_request, seq_len), self.mask_id, device=self._device)
            with torch.no_grad():
                self.model(ids, policy=self.policy)
            return batch_size

        size = probe()  # per rank, no collective: a rank served wholly by --use_cache never probes
        log.info("batch_size=auto: %d requests per batch", size)
        return size

    def _denoiser(self, task: torch.Tensor, answer_len: torch.Tensor, answer: torch.Tensor | None, forward=None):
        """A ``denoise(ids, attention_mask, logits_at, cache, window)`` that charges every forward to its rows'
        tasks (and answers, under --use_cache); ``task``, ``answer_len``, ``answer`` [B] describe
        the requests of the batch. ``denoise.select(rows)`` names the request of each row of the
        next forwards (default: row i is request i); CFG doubles the rows, so they repeat."""
        state = {"rows": torch.arange(len(task), device=task.device)}
        forward = forward or self.model

        def denoise(ids, attention_mask, logits_at, cache=None, window=None):
            logits, trace = forward(ids, attention_mask, policy=self.policy, logits_at=logits_at, cache=cache, window=window)
            rows = state["rows"].repeat(len(ids) // len(state["rows"]))
            self.meter.record(trace, task[rows], answer_len[rows])
            if answer is not None:
                self.answer_cache.meter.record(trace, answer[rows], answer_len[rows])
            return logits

        denoise.select = lambda rows: state.update(rows=rows)
        return denoise

    def _answer_rows(self, answer_index: dict[int, int] | None, owners) -> torch.Tensor | None:
        """[B] the --use_cache meter index of each request's answer (None without a cache)."""
        return None if answer_index is None else torch.tensor([answer_index[o] for o in owners], device=self._device)

    def _finish_call(self, kind: str, requests: list[Instance]) -> None:
        """Read this call's device sums (one sync), store each answer's FLOPs under --use_cache, and
        log them; under several processes ``barrier`` merges the ranks' figures and logs them."""
        added = self.meter.flush()
        if self.answer_cache is not None:
            self.answer_cache.store(kind, requests)
        if self.world_size > 1:
            self._unmerged.append(added)
        else:
            self._log_flops(kind, added)

    def _count_served(self) -> None:
        """Add the FLOPs of the answers lm-eval served from --use_cache without calling the model."""
        if self.answer_cache is None:
            return
        served, missing = self.answer_cache.served()
        if missing:
            log.warning("--use_cache served %d answers whose FLOPs were never stored (their run stopped "
                        "before the end of its call); the per-task FLOPs leave them out", missing)
        if served:
            log.info("%s: counted the FLOPs of %d answers served by --use_cache", self.decoding.model, len(served))
        self.meter.merge(served)
        if self.world_size > 1:
            self._unmerged.extend(served)

    def _log_flops(self, kind: str, tasks) -> None:
        if self.rank != 0:
            return
        summaries = self.meter.summary()
        for task in sorted(tasks):
            summary = summaries[task]
            log.info(
                "%s %s [%s]: normalized FLOPs %.4f (papers) %.4f (whole model), "
                "%.2f of %d blocks executed on average over %d forwards",
                self.decoding.model, kind, task, summary["normalized_flops_papers"],
                summary["normalized_flops_whole_model"], summary["mean_executed_blocks"], self.cfg.n_layers,
                summary["forwards"],
            )
        for warning in self.meter.router_warnings(tasks, self.decoding.model):
            log.warning(warning)

    # ---- loglikelihood -----------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        encoded = []
        for context, continuation in (req.args for req in requests):
            if context == "":
                cont = self.tok_encode(continuation)
                ctx, cont = ([self.prefix_token_id], cont) if cont[:1] != [self.prefix_token_id] else (cont[:1], cont[1:])
            else:
                ctx, cont = self._encode_pair(context, continuation)
            encoded.append(((context, continuation), ctx, self.likelihood_answer(cont)))
        tasks = [req.task_name for req in requests]
        greedy = greedy_wanted(requests, self.check_greedy)
        scores = self._loglikelihood_tokens(encoded, tasks=tasks, greedy=greedy, disable_tqdm=disable_tqdm)
        self._finish_call("loglikelihood", requests)
        return scores

    def _loglikelihood_tokens(
        self, requests, tasks: list[str | None] | None = None, greedy: list[bool] | None = None,
        owners: list[int] | None = None, disable_tqdm: bool = False, **kwargs,
    ):
        """(score, is_greedy) per (strings, context ids, continuation ids); is_greedy is computed
        where ``greedy`` asks for it (a forward per answer token) and False elsewhere. ``owners``
        says which answer each item is part of (its FLOPs go there; default: item i is answer i)."""
        tasks = tasks or [None] * len(requests)
        greedy = greedy or [False] * len(requests)
        owners = owners or list(range(len(requests)))
        task_index = self.meter.start([str(t) for t in tasks])
        answer_index = self.answer_cache.start(owners) if self.answer_cache is not None else None
        items = list(zip(requests, map(str, tasks), greedy, owners))
        for (strings, ctx, cont), _, _, _ in items:
            if not cont:
                raise ValueError(f"loglikelihood: continuation {strings[1]!r} encodes to no tokens")
        collator = Collator(items, sort_fn=lambda item: (-len(item[0][1]) - len(item[0][2]), item[0][1]))
        longest = max(len(c) + len(a) for (_, c, a), _, _, _ in items) if items else 1
        rows = self.likelihood.group_size * (2 if self.likelihood.cfg else 1)
        batch_size = self._batch_size(rows, min(longest, self.max_length))
        results = []
        bar = tqdm(total=len(items), disable=disable_tqdm or self.rank != 0, desc=f"{self.decoding.model} loglikelihood")
        for chunk in collator.get_batched(n=batch_size):
            prompts, answers = zip(*(self._fit(ctx, cont) for (_, ctx, cont), _, _, _ in chunk))
            task_rows = torch.tensor([task_index[task] for _, task, _, _ in chunk], device=self._device)
            lengths = torch.tensor([len(a) for a in answers], device=self._device)
            denoise = self._denoiser(task_rows, lengths, self._answer_rows(answer_index, [o for *_, o in chunk]))
            generators = [request_generator(self.mc_seed, p, a) for p, a in zip(prompts, answers)]
            scores = mc_loglikelihood(
                denoise, list(prompts), list(answers), self.likelihood, self.mask_id, self.tokenizer.pad_token_id,
                generators, self._device, on_rows=denoise.select,
            )
            greedy_flags = self._greedy(denoise, chunk, prompts, answers)
            for ((strings, _, _), _, _, _), score, is_greedy in zip(chunk, scores, greedy_flags):
                results.append((score, bool(is_greedy)))
                self.cache_hook.add_partial("loglikelihood", strings, (score, bool(is_greedy)))
            bar.update(len(chunk))
        bar.close()
        return collator.get_original(results)

    def _greedy(self, denoise, chunk, prompts, answers) -> list[bool]:
        """is_greedy for the rows of ``chunk`` that want it (upstream's suffix_greedy_prediction)."""
        wanted = [i for i, (_, _, wants, _) in enumerate(chunk) if wants]
        result = [False] * len(chunk)
        if not wanted:
            return result
        denoise.select(torch.tensor(wanted, device=self._device))
        matches = greedy_matches(
            denoise, [prompts[i] for i in wanted], [answers[i] for i in wanted], self.likelihood.cfg,
            self.mask_id, self.tokenizer.pad_token_id, self._device,
        )
        for i, match in zip(wanted, matches):
            result[i] = bool(match)
        return result

    def _fit(self, ctx: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
        """Left-truncate the context so context + continuation fit ``max_length`` (with a warning)."""
        if len(cont) >= self.max_length:
            raise ValueError(
                f"loglikelihood: a continuation of {len(cont)} tokens does not fit max_length={self.max_length}; "
                "raise max_length (up to the model's max_sequence_length)"
            )
        excess = len(ctx) + len(cont) - self.max_length
        if excess > 0:
            log.warning("context of %d tokens left-truncated by %d to fit max_length=%d", len(ctx), excess, self.max_length)
            ctx = ctx[excess:]
        return ctx, cont

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents for perplexity tasks.

        The token stream is cut into disjoint windows of at most ``max_length - 1`` tokens (lm-eval's
        rolling windows with one token of context, as its HF model uses): each window is scored by
        the Monte-Carlo estimator conditioned on the token before it (EOS for the first; the last
        window, which keeps a full-size input, on the tokens before it that fit), and the window
        scores are summed. Each term is an ELBO, so the total is a lower bound on log p(document).
        """
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owners, tasks = [], [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length - 1, 1),
            ):
                windows.append(((text, ""), ctx, cont))
                owners.append(i)
                tasks.append(req.task_name)
        scores = [0.0] * len(requests)
        cache_hook, self.cache_hook = self.cache_hook, CacheHook(None)  # windows are not lm-eval requests
        try:
            window_scores = self._loglikelihood_tokens(windows, tasks=tasks, owners=owners, disable_tqdm=disable_tqdm) if windows else []
        finally:
            self.cache_hook = cache_hook
        for owner, (score, _) in zip(owners, window_scores):
            scores[owner] += score
        for req, score in zip(requests, scores):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, score)
        self._finish_call("loglikelihood_rolling", requests)
        return scores

    # ---- generate_until ----------------------------------------------------------------------
    def generation_settings(self, gen_kwargs: dict) -> tuple[GenerationSettings, list[str], dict[str, str]]:
        """A request's decoding settings, stop strings, and each setting's value and source."""
        return resolve_generation(gen_kwargs, self.gen_args, self.decoding)

    def _announce(self, tasks, origin: dict[str, str]) -> None:
        """Log the decoding settings of each task once; a warning when model_args replaced a task's value."""
        for task in sorted(set(tasks) - self._announced):
            self._announced.add(task)
            level = logging.WARNING if any("over the task's" in v for v in origin.values()) else logging.INFO
            described = ", ".join(f"{k}={v}" for k, v in origin.items())
            log.log(level, "%s [%s] decodes with %s", self.decoding.model, task, described)

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        if not requests:
            return []
        task_index = self.meter.start([str(req.task_name) for req in requests])
        answer_index = self.answer_cache.start(list(range(len(requests)))) if self.answer_cache is not None else None
        items = [(req.args[0], req.args[1], str(req.task_name), i) for i, req in enumerate(requests)]
        collator = Collator(
            items, sort_fn=lambda item: (-len(self.tok_encode(item[0])), item[0]), group_by="gen_kwargs", group_fn=lambda item: item[1]
        )
        results = []
        bar = tqdm(total=len(items), disable=disable_tqdm or self.rank != 0, desc=f"{self.decoding.model} generate_until")
        for chunk in collator.get_batched(n=self._generation_batch_size(items)):
            contexts, all_kwargs, chunk_tasks, chunk_answers = zip(*chunk)
            settings, until, origin = self.generation_settings(dict(all_kwargs[0]))
            self._announce(chunk_tasks, origin)
            ids, attention_mask = self._encode_prompts(list(contexts), self.max_length - settings.gen_length)
            task_rows = torch.tensor([task_index[t] for t in chunk_tasks], device=self._device)
            row_seeds = sampling_seeds(self.seed, ids, attention_mask)
            answer_len = torch.full_like(task_rows, settings.gen_length)
            answer_rows = self._answer_rows(answer_index, chunk_answers)
            denoise = self._denoiser(task_rows, answer_len, answer_rows, self.generation_forward)
            self._count_decoding(task_rows, answer_rows, ids, attention_mask, settings)
            out = self.decode(denoise, ids, attention_mask, settings, row_seeds)
            for context, kwargs, answer in zip(contexts, all_kwargs, out[:, ids.shape[1] :].tolist()):
                text = self.decode_answer(answer, until)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, kwargs), text)
            bar.update(len(chunk))
        bar.close()
        self._finish_call("generate_until", requests)
        return collator.get_original(results)

    def _count_decoding(self, task_rows, answer_rows, ids, attention_mask, settings: GenerationSettings) -> None:
        """Count the batch's rows for NFE per request, and what upstream's uncached decoding without
        skipping would have spent on them (its steps, each a full forward with the head over a block)."""
        rows = 2 if settings.cfg else 1
        real = ids.shape[1] if attention_mask is None else attention_mask.sum(1)
        seq_lens = (torch.as_tensor(real, device=self._device) + settings.gen_length).expand(len(ids)).repeat(rows)
        plain = self.meter.flops.plain_decoding(seq_lens, settings.steps, settings.block_length)
        self.meter.decoding(task_rows.repeat(rows), plain)
        if answer_rows is not None:
            self.answer_cache.meter.decoding(answer_rows.repeat(rows), plain)

    def decode_answer(self, answer: list[int], until: list[str]) -> str:
        """As upstream's evaluation: decode, cut at the first stop string, then drop special tokens
        by re-tokenizing (EOS is not a stop string there; text after it survives, minus the token)."""
        text = postprocess_generated_text(self.tokenizer.decode(answer, skip_special_tokens=False), until, None)
        return self.tokenizer.decode(self.tok_encode(text), skip_special_tokens=True)

    def _generation_batch_size(self, items) -> int:
        if not self.batch_size_arg.startswith("auto"):
            return self._batch_size(1, 1)
        longest = max(len(self.tok_encode(c)) for c, *_ in items)
        settings, _, _ = self.generation_settings(dict(items[0][1]))
        return self._batch_size(2 if settings.cfg else 1, min(longest + settings.gen_length, self.max_length))

    def _encode_prompts(self, contexts: list[str], max_prompt: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Left-padded prompt ids [B, P] and attention mask (None when no row is padded)."""
        if max_prompt < 1:
            raise ValueError(f"gen_length leaves no room for a prompt within max_length={self.max_length}")
        encoded = [self.tok_encode(c) for c in contexts]
        for i, enc in enumerate(encoded):
            if len(enc) > max_prompt:
                log.warning("prompt of %d tokens left-truncated to %d to leave room for the answer", len(enc), max_prompt)
                encoded[i] = enc[-max_prompt:]
        P = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), P), self.tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros(len(encoded), P, dtype=torch.long)
        for i, enc in enumerate(encoded):
            ids[i, P - len(enc) :] = torch.tensor(enc, dtype=torch.long)
            attention[i, P - len(enc) :] = 1
        padded = not bool(attention.all())
        return ids.to(self._device), attention.to(self._device) if padded else None


def sampling_seeds(seed: int, ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """[B] int64 noise keys from (seed, each row's prompt tokens): sampled decoding of a request
    then depends on the request alone, never on the batch it shares."""
    return row_keys(ids, attention_mask) + ((seed % 2**32) << 31)  # row keys are < 2^31


def greedy_wanted(requests: list[Instance], every: bool) -> list[bool]:
    """Which loglikelihood requests need ``is_greedy``: those of ``loglikelihood`` tasks, whose ``acc``
    (LAMBADA's) is "the answer is the greedy one"; every request when ``every`` (check_greedy=True:
    only an ``exact_match`` metric on a multiple_choice task reads it there).

    An Instance does not name its task's output type, but a multiple_choice task sends the choices
    of a document as idx 0, 1, ... while a loglikelihood task sends one request, idx 0: a document
    with a request of idx > 0 is multiple choice. (A lone idx-0 choice, its siblings served by
    --use_cache, is taken for a loglikelihood request: a greedy check too many, no wrong answer.)
    """
    if every:
        return [True] * len(requests)
    multiple_choice = {(req.task_name, req.doc_id) for req in requests if req.idx > 0}
    return [(req.task_name, req.doc_id) not in multiple_choice for req in requests]


def build_policy(n_layers: int, skip_layers: Any, skip_random: Any, seed: int) -> SkipPolicy:
    """The static or random skip policy the model_args ask for."""
    if skip_layers is not None:
        layers = parse_layers(skip_layers, "skip_layers")
        check_layers(layers, n_layers, "skip_layers")
        return StaticSkip(layers) if layers else NO_SKIP
    if skip_random is not None:
        policy = RandomSkip(skip_random, n_layers, seed)
        policy.check(n_layers)
        return policy
    return NO_SKIP


def describe_router(routed: RouterCheckpoint) -> dict:
    meta = routed.meta
    return {
        "method": "routed",
        "router": str(routed.path),
        "tau": routed.routers.cfg.tau,
        **{k: meta.get(k) for k in ("lambda", "alpha_target", "mask_scaling")},
        "router_shape": meta["router"],
        "trained_on": meta.get("training", {}).get("source"),
        "trained_for": meta["base_model"]["name"],
        # A checkpoint saved mid-training scores as a partly trained router.
        "completed_steps": meta.get("training", {}).get("completed_steps"),
        "training_steps": meta.get("training", {}).get("steps"),
        "finished": meta.get("training", {}).get("finished"),
    }


def warn_if_unfinished(routed: RouterCheckpoint) -> None:
    """One warning line when the router was saved mid-training, with the command that finishes it."""
    training = routed.meta.get("training", {})
    if training.get("finished") is False:
        from .train import resume_command

        log.warning("router=%s was saved mid-training: it stopped at step %s of %s, so these results are a partly "
                    "trained router's; finish it with: %s", routed.path, training.get("completed_steps"),
                    training.get("steps"), resume_command(routed.path.resolve()))


def describe_policy(policy: SkipPolicy) -> dict:
    if isinstance(policy, StaticSkip):
        return {"method": "static", "skip_layers": sorted(policy.layers), "k": len(policy.layers)}
    if isinstance(policy, RandomSkip):
        return {"method": "random", "k": policy.k, "seed": policy.seed}
    return {"method": "none"}


def check_model_args(args: dict[str, Any], model: type = LLaDASkipLM) -> None:
    """Name an unknown model_args key and suggest the closest known one."""
    known = set(inspect.signature(model.__init__).parameters) - {"self"}
    for key in args:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"{model.decoding.model}: unknown model_args key {key!r}.{hint} Known keys: {', '.join(sorted(known))}"
            )
