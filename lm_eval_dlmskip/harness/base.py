"""The lm-eval model of every diffusion family (``llada_skip``, ``dream_skip``): requests batched
across requests (longest first, generation grouped by gen_kwargs, as lm-eval's HFLM does), handed to
the decoding algorithms as a ``denoise(ids, attention_mask, logits_at)`` callable, and every
forward's skip trace charged to the request's task. The per-task FLOPs figures and every skipping
and sampling setting come back through ``get_model_info()``, which lm-eval merges into
``results["config"]``. A family (llada.py, dream.py) names its checkpoints, decoding and likelihood.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict
from functools import partial
from typing import Any, Mapping

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import CacheHook, TemplateLM
from lm_eval.models.utils import Collator, postprocess_generated_text

from ..common.errors import argument_errors
from ..data import render_chat
from ..decoding.graphs import GraphRunner
from ..decoding.likelihood import LikelihoodSettings, greedy_matches, mc_loglikelihood, request_generator
from ..models.loading import adapter_fingerprint, load_model, load_tokenizer, merge_lora, tokenizer_fingerprint
from ..skipping.flops import FlopsMeter, TaskTotals
from ..skipping.identity import with_adapter
from .answer_cache import AnswerCache, settings_identity
from .flops_table import TableAtExit, format_flops_table, log_task_flops
from .gen_kwargs import DecodingSpec, generation_tasks, kwargs_key, resolve_generation, resolve_tasks
from .model_args import ModelArgs, parse_model_args
from .requests import (
    choose_device,
    device_names,
    encode_prompts,
    fit_context,
    greedy_wanted,
    largest_batch,
    progress,
    rolling_windows,
    sampling_seeds,
    split_over_devices,
    sum_pieces,
)
from .skip_method import skip_method, warn_if_unfinished

log = logging.getLogger("lm_eval.llada_skip")  # under lm-eval's logger, so its CLI shows our lines
clock = time.perf_counter  # the wall clock of the speed figures


class DiffusionSkipLM(TemplateLM):
    """A diffusion LM in lm-eval: Monte-Carlo likelihood, diffusion decoding, every skip method.

    Block indices in ``skip_layers`` are 0-based (the papers' k=3 set {5,7,9} is ``[4,6,8]``).
    ``model_args`` are parsed once into ``self.args`` (model_args.py); the keys a family takes are
    the common ones, its decoding keys and ``extra_args``."""

    backend = "causal"  # context and continuation are encoded together, then split
    family: str  # the checkpoints this model takes (loading.py refuses the others)
    decoding: DecodingSpec  # its decoding settings and their keys (gen_kwargs.py)
    extra_args: dict[str, Any] = {}  # model_args only this family takes, with their defaults
    graphs = True  # whether generation's forwards replay from CUDA graphs (decoding/graphs.py) on a GPU

    def __init__(self, pretrained: str | None = None, **model_args: Any) -> None:
        super().__init__()
        self.args: ModelArgs = self.check_arguments({"pretrained": pretrained, **model_args})
        with argument_errors(self.decoding.model):  # a checkpoint, router or profile that does not fit
            self._load(self.args)

    @classmethod
    def check_arguments(cls, model_args: Mapping[str, Any]) -> ModelArgs:
        """Every check of the model_args that needs no model (``dlmskip check`` and the ``lm_eval``
        command line run it before lm-eval indexes its tasks): an ``ArgumentError`` names the problem."""
        return parse_model_args(model_args, cls)

    def _load(self, args: ModelArgs) -> None:
        if args.trust_remote_code:
            log.info("trust_remote_code is not needed: %s runs its own model code and executes none from the hub",
                     self.decoding.model)
        self._setup_distributed(args.device)
        self.checkpoint = checkpoint = load_model(args.pretrained, revision=args.revision, dtype=args.dtype,
                                                  device=self._device, family=self.family,
                                                  **split_over_devices(args.parallel, self.world_size))
        self.model, fingerprint, self._device = checkpoint.model, checkpoint.fingerprint, checkpoint.model.device
        # The fast path by default on a GPU: compiled blocks (and CUDA graphs below); compile=False turns it off.
        self.compiled = args.compile if args.compile is not None else self._device.type == "cuda"
        if args.peft:  # skip profiles and routers must fit the weights evaluated, adapter merged
            self.model = merge_lora(checkpoint.model, args.peft, args.revision)
            fingerprint = with_adapter(fingerprint, adapter_fingerprint(args.peft, args.revision))
        self.cfg = checkpoint.model.cfg
        self.tokenizer = load_tokenizer(checkpoint.path if args.tokenizer is None else args.tokenizer, self.cfg.mask_token_id)
        # What needs the model and its tokenizer (block range, fit of a router or profile) fails here, before the rest.
        method = skip_method(args.skip, self.cfg, fingerprint, tokenizer_fingerprint(self.tokenizer), self._device,
                             self.model.dtype, self.compiled, self.model.block_devices)
        if method.routers is not None:
            warn_if_unfinished(method.routers, log)
            if method.routers.adapter is not None:
                self.model = merge_lora(self.model, str(method.routers.adapter))
        self.policy = method.policy
        if self.compiled:
            self.model.compile_blocks()
        self.mask_id = self.cfg.mask_token_id
        self._max_length = args.max_length or self.cfg.max_sequence_length
        self.likelihood = args.likelihood
        self.gen_args = args.decoding  # what the user typed for decoding (None: the task or the default decides)
        self._announced: set[str] = set()  # tasks whose decoding settings were logged
        self._decoding_by_task: dict[str, dict] = {}  # each task's decoding settings, for the speed figures
        # what the results record: with peft's adapter in the fingerprint (a router's own adapter belongs to it)
        self.settings = args.described(fingerprint, method.description, self.compiled, self._max_length)
        self.meter = FlopsMeter(method.flops, self._device)
        self.answer_cache: AnswerCache | None = None  # with --use_cache
        self._unmerged: list[dict[str, TaskTotals]] = []  # this rank's FLOPs since the last merge
        self._flops_table = TableAtExit()  # printed at exit under the lm_eval CLI
        # Generation repeats one shape for every denoising step: replay it from CUDA graphs (on one device).
        use_graphs = args.cuda_graphs and self._device.type == "cuda" and self.graphs and self.model.block_devices is None
        self.generation_forward = GraphRunner(self.model) if use_graphs else self.model

    # ---- what a model family changes (llada.py, dream.py) ---------------------------------------
    @classmethod
    def likelihood_settings(cls, args: Mapping[str, Any]) -> LikelihoodSettings:
        """The Monte-Carlo estimator's settings from the (unchecked) model_args."""
        raise NotImplementedError

    @classmethod
    def check_family_args(cls, args: Mapping[str, Any]) -> None:
        """Refuse model_args values the family cannot honour (before anything is loaded)."""

    def likelihood_answer(self, continuation: list[int]) -> list[int]:
        """The tokens scored as the answer of a loglikelihood request."""
        return continuation

    def decode(self, denoise, ids: torch.Tensor, attention_mask: torch.Tensor | None, settings, row_seeds) -> torch.Tensor:
        """The family's diffusion decoding: left-padded prompt ids [B, P] -> answers [B, gen_length]."""
        raise NotImplementedError

    @property
    def likelihood_forward(self):
        """The forward the Monte-Carlo likelihood's rows run through."""
        return self.model

    def plain_decoding_flops(self, prompt_lens: torch.Tensor, settings: Any) -> torch.Tensor:
        """[B] FLOPs of upstream's uncached decoding without skipping for prompts of ``prompt_lens``
        (the baseline of ``normalized_flops_vs_plain_decoding``): its steps, each a full forward
        with the head over a block."""
        return self.meter.flops.plain_decoding(prompt_lens + settings.gen_length, settings.steps, settings.block_length)

    # ---- lm-eval conventions -------------------------------------------------------------
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
        self._device = choose_device(device)

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
        return render_chat(self.tokenizer, chat_history, add_generation_prompt)

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
            log_task_flops(log, self.meter, "all ranks", self.meter.merge_ranks(gathered), self.decoding.model,
                           self.cfg.n_layers, "blocks executed", self.rank)
        self.accelerator.wait_for_everyone()

    def set_cache_hook(self, cache_hook: CacheHook) -> None:
        """--use_cache: refuse a cache written with other settings; keep each answer's FLOPs with it."""
        if cache_hook.dbdict is not None:
            identity = settings_identity(self.settings, self.model.dtype, self.tokenizer)
            self.answer_cache = AnswerCache(cache_hook.dbdict, identity, self.meter.flops, self._device, self.decoding.model)
        super().set_cache_hook(cache_hook)

    def get_model_info(self) -> dict:
        self._count_served()
        flops, speed = self.meter.summary(), self.meter.speed()
        table = {task: {**summary, **speed.get(task, {})} for task, summary in flops.items()}
        self._flops_table.show(format_flops_table(table, self.cfg.n_layers, self.decoding.model))
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(self.model.dtype),
            "model_revision": self.settings["revision"],
            "model_sha": self.checkpoint.hub_commit,
            "dlmskip": {**self.settings, "family": self.cfg.family, "n_layers": self.cfg.n_layers, "flops": flops,
                        "speed": {**self.speed_settings(), "tasks": speed}},
        }

    def speed_settings(self) -> dict:
        """What the per-task speed figures were measured with: device(s), batch size, dtype, fast path, decoding."""
        return {"device": device_names(self._device, self.model.block_devices), "processes": self.world_size, "batch_size": self.args.batch_size,
                "dtype": str(self.model.dtype).removeprefix("torch."), "compile": self.compiled,
                "cuda_graphs": self.generation_forward is not self.model, "decoding": self._decoding_by_task}

    # ---- batching helpers ------------------------------------------------------------------
    def _batch_size(self, rows_per_request: int, seq_len: int) -> int:
        """``batch_size`` as an int; ``auto`` probes the largest request batch that fits in memory."""
        if not self.args.batch_size.startswith("auto"):
            return int(self.args.batch_size)  # checked >= 1 before loading
        forward = partial(self.model, policy=self.policy)  # per rank, no collective: a rank served by --use_cache never probes
        return largest_batch(forward, self.mask_id, rows_per_request, seq_len, self.args.max_batch_size, self._device)

    def _denoiser(self, task: torch.Tensor, answer_len: torch.Tensor, answer: torch.Tensor | None, forward=None):
        """A ``denoise(ids, attention_mask, logits_at, cache, window)`` that charges every forward to its rows'
        tasks (and answers, under --use_cache); ``task``, ``answer_len``, ``answer`` [B] describe
        the requests of the batch. ``denoise.select(rows)`` names the request of each row of the
        next forwards (default: row i is request i); CFG doubles the rows, so they repeat."""
        state = {"rows": torch.arange(len(task), device=task.device)}
        forward = forward or self.model

        def denoise(ids, attention_mask, logits_at, cache=None, window=None, **options):
            logits, trace = forward(ids, attention_mask, policy=self.policy, logits_at=logits_at, cache=cache, window=window,
                                    **options)
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
            log_task_flops(log, self.meter, kind, added, self.decoding.model, self.cfg.n_layers, "blocks executed", self.rank)

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
        greedy = greedy_wanted(requests, self.args.check_greedy)
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
        with progress(len(items), f"{self.decoding.model} loglikelihood", disable_tqdm or self.rank != 0) as bar:
            for chunk in collator.get_batched(n=batch_size):
                self._score_batch(chunk, task_index, answer_index, results)
                bar.update(len(chunk))
        return collator.get_original(results)

    def _score_batch(self, chunk, task_index: dict[str, int], answer_index: dict[int, int] | None, results: list) -> None:
        """Score one batch of loglikelihood items into ``results`` (and lm-eval's cache hook)."""
        tic = clock()
        prompts, answers = zip(*(fit_context(ctx, cont, self.max_length) for (_, ctx, cont), _, _, _ in chunk))
        task_rows = torch.tensor([task_index[task] for _, task, _, _ in chunk], device=self._device)
        lengths = torch.tensor([len(a) for a in answers], device=self._device)
        denoise = self._denoiser(task_rows, lengths, self._answer_rows(answer_index, [o for *_, o in chunk]),
                                 self.likelihood_forward)
        generators = [request_generator(self.args.mc_seed, p, a) for p, a in zip(prompts, answers)]
        scores = mc_loglikelihood(
            denoise, list(prompts), list(answers), self.likelihood, self.mask_id, self.tokenizer.pad_token_id,
            generators, self._device, on_rows=denoise.select,
        )
        greedy_flags = self._greedy(denoise, chunk, prompts, answers)
        for ((strings, _, _), _, _, _), score, is_greedy in zip(chunk, scores, greedy_flags):
            results.append((score, bool(is_greedy)))
            self.cache_hook.add_partial("loglikelihood", strings, (score, bool(is_greedy)))
        self.meter.timed([task for _, task, _, _ in chunk], clock() - tic)  # the scores are on the host

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

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents for perplexity tasks.

        The token stream is cut into disjoint windows of at most ``max_length - 1`` tokens (lm-eval's
        rolling windows with one token of context, as its HF model uses): each window is scored by
        the Monte-Carlo estimator conditioned on the token before it (EOS for the first; the last
        window, which keeps a full-size input, on the tokens before it that fit), and the window
        scores are summed. Each term is an ELBO, so the total is a lower bound on log p(document).
        """
        windows, owners, tasks = rolling_windows(requests, self.tok_encode, self.prefix_token_id, self.max_length)
        with self.pieces_only():  # windows are not lm-eval requests
            window_scores = self._loglikelihood_tokens(windows, tasks=tasks, owners=owners, disable_tqdm=disable_tqdm) if windows else []
        scores = [score for score, _ in sum_pieces(owners, window_scores, len(requests))]
        for req, score in zip(requests, scores):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, score)
        self._finish_call("loglikelihood_rolling", requests)
        return scores

    @contextmanager
    def pieces_only(self):
        """Score pieces of requests (rolling windows, LLaDA2's answer blocks) without writing them
        into lm-eval's answer cache, which keys whole requests."""
        cache_hook, self.cache_hook = self.cache_hook, CacheHook(None)
        try:
            yield
        finally:
            self.cache_hook = cache_hook

    # ---- generate_until ----------------------------------------------------------------------
    def generation_settings(self, gen_kwargs: dict) -> tuple[Any, list[str], dict[str, str]]:
        """A request's decoding settings, stop strings, and each setting's value and source (what
        requests run with also fits ``max_length``: ``_settings_of``)."""
        return resolve_generation(gen_kwargs, self.gen_args, self.decoding)

    def dlmskip_check_tasks(self, task_dict: Mapping[Any, Any]) -> None:
        """Judge (and log) every task's generation settings before any request: the start-up hook calls
        this from lm-eval's ``evaluate`` before it builds requests (every rank; --use_cache's CachingLM
        passes it through), so a wrong length fails before the first loglikelihood request."""
        self._settings_of(generation_tasks(task_dict))

    def _settings_of(self, pairs: list[tuple[str, Mapping[str, Any]]]) -> dict[str, tuple[Any, list[str], dict[str, str]]]:
        """The settings of each distinct generation_kwargs among (task, generation_kwargs) pairs,
        keyed by ``kwargs_key``: all judged before any is used; each task's logged once."""
        with argument_errors(self.decoding.model):
            resolved = resolve_tasks(pairs, self.gen_args, self.decoding, self.max_length)
        for task, gen_kwargs in pairs:
            settings, _, origin = resolved[kwargs_key(gen_kwargs)]
            self._announce(task, settings, origin)
        return resolved

    def _announce(self, task: str, settings: Any, origin: dict[str, str]) -> None:
        """Log a task's decoding settings once (and keep them for the speed figures); a warning when
        model_args replaced a task's value."""
        if task in self._announced:
            return
        self._announced.add(task)
        self._decoding_by_task[task] = asdict(settings)
        level = logging.WARNING if any("over the task's" in v for v in origin.values()) else logging.INFO
        described = ", ".join(f"{k}={v}" for k, v in origin.items())
        log.log(level, "%s [%s] decodes with %s", self.decoding.model, task, described)

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        if not requests:
            return []
        # all judged before the first is decoded, also for a library calling this without lm-eval's evaluate
        resolved = self._settings_of([(str(req.task_name), req.args[1]) for req in requests])
        task_index = self.meter.start([str(req.task_name) for req in requests])
        answer_index = self.answer_cache.start(list(range(len(requests)))) if self.answer_cache is not None else None
        items = [(req.args[0], req.args[1], str(req.task_name), i) for i, req in enumerate(requests)]
        collator = Collator(
            items, sort_fn=lambda item: (-len(self.tok_encode(item[0])), item[0]), group_by="gen_kwargs", group_fn=lambda item: item[1]
        )
        results: list[str] = []
        batch_size = self._generation_batch_size(items, resolved)
        with progress(len(items), f"{self.decoding.model} generate_until", disable_tqdm or self.rank != 0) as bar:
            for chunk in collator.get_batched(n=batch_size):
                settings, until, _ = resolved[kwargs_key(chunk[0][1])]
                results += self._generate_batch(chunk, settings, until, task_index, answer_index)
                bar.update(len(chunk))
        self._finish_call("generate_until", requests)
        return collator.get_original(results)

    def _generate_batch(self, chunk, settings, until: list[str], task_index: dict[str, int], answer_index) -> list[str]:
        """Decode one batch of requests that share their generation_kwargs; their answers' text."""
        tic = clock()
        contexts, all_kwargs, chunk_tasks, chunk_answers = zip(*chunk)
        ids, attention_mask = encode_prompts([self.tok_encode(c) for c in contexts], self.max_length - settings.gen_length,
                                             self.max_length, self.tokenizer.pad_token_id, self._device)
        task_rows = torch.tensor([task_index[t] for t in chunk_tasks], device=self._device)
        row_seeds = sampling_seeds(self.args.seed, ids, attention_mask)
        answer_len = torch.full_like(task_rows, settings.gen_length)
        answer_rows = self._answer_rows(answer_index, chunk_answers)
        denoise = self._denoiser(task_rows, answer_len, answer_rows, self.generation_forward)
        self._count_decoding(task_rows, answer_rows, ids, attention_mask, settings)
        answers = self.decode(denoise, ids, attention_mask, settings, row_seeds)
        texts = []
        for context, kwargs, answer in zip(contexts, all_kwargs, answers.tolist()):
            texts.append(self.decode_answer(answer, until))
            self.cache_hook.add_partial("generate_until", (context, kwargs), texts[-1])
        self.meter.timed(list(chunk_tasks), clock() - tic, settings.gen_length)  # the answers are on the host
        return texts

    def _count_decoding(self, task_rows, answer_rows, ids, attention_mask, settings: Any) -> None:
        """Count the batch's rows for NFE per request, and what upstream's uncached decoding without
        skipping would have spent on them (``plain_decoding_flops``)."""
        rows = 2 if settings.cfg else 1
        real = ids.shape[1] if attention_mask is None else attention_mask.sum(1)
        prompt_lens = torch.as_tensor(real, device=self._device).expand(len(ids)).repeat(rows).double()
        plain = self.plain_decoding_flops(prompt_lens, settings)
        self.meter.decoding(task_rows.repeat(rows), plain)
        if answer_rows is not None:
            self.answer_cache.meter.decoding(answer_rows.repeat(rows), plain)

    def decode_answer(self, answer: list[int], until: list[str]) -> str:
        """As upstream's evaluation: decode, cut at the first stop string, then drop special tokens
        by re-tokenizing (EOS is not a stop string there; text after it survives, minus the token)."""
        text = postprocess_generated_text(self.tokenizer.decode(answer, skip_special_tokens=False), until, None)
        return self.tokenizer.decode(self.tok_encode(text), skip_special_tokens=True)

    def _generation_batch_size(self, items, resolved: dict[str, tuple]) -> int:
        if not self.args.batch_size.startswith("auto"):
            return self._batch_size(1, 1)
        longest = max(len(self.tok_encode(c)) for c, *_ in items)
        settings = resolved[kwargs_key(items[0][1])][0]
        return self._batch_size(2 if settings.cfg else 1, min(longest + settings.gen_length, self.max_length))

