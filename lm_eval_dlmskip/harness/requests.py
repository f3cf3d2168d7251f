"""Helpers of the request handling that need no model: prompts as a left-padded batch, the
sampling noise keys of a row, which loglikelihood requests need ``is_greedy``, and progress bars
that log lines do not break."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from lm_eval.api.instance import Instance
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..skipping.policies import row_keys
from .model_args import Parallel

log = logging.getLogger("lm_eval.llada_skip")


def encode_prompts(
    encoded: list[list[int]], max_prompt: int, max_length: int, pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Left-padded prompt ids [B, P] and attention mask (None when no row is padded); a prompt
    longer than ``max_prompt`` is left-truncated (with a warning) to leave room for the answer."""
    if max_prompt < 1:
        raise ValueError(f"gen_length leaves no room for a prompt within max_length={max_length}")
    for i, enc in enumerate(encoded):
        if len(enc) > max_prompt:
            log.warning("prompt of %d tokens left-truncated to %d to leave room for the answer", len(enc), max_prompt)
            encoded[i] = enc[-max_prompt:]
    P = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), P), pad_id, dtype=torch.long)
    attention = torch.zeros(len(encoded), P, dtype=torch.long)
    for i, enc in enumerate(encoded):
        ids[i, P - len(enc) :] = torch.tensor(enc, dtype=torch.long)
        attention[i, P - len(enc) :] = 1
    padded = not bool(attention.all())
    return ids.to(device), attention.to(device) if padded else None


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


@contextmanager
def progress(total: int, desc: str, disable: bool) -> Iterator[tqdm]:
    """A progress bar during which our log lines are written above the bar (tqdm.write), never
    onto its line: the console handlers of the loggers ours reaches (lm-eval's) are swapped for
    tqdm's while the bar runs."""
    loggers, current = [], log
    while current is not None:
        if any(_on_console(h) for h in current.handlers):
            loggers.append(current)
        current = current.parent if current.propagate else None
    with logging_redirect_tqdm(loggers=loggers), tqdm(total=total, desc=desc, disable=disable) as bar:
        yield bar


def _on_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (sys.stdout, sys.stderr)


LM_EVAL_DEFAULT_DEVICE = "cuda:0"  # what lm_eval passes as device when --device is not given


def choose_device(device: str | None) -> torch.device:
    """The device asked for, else CUDA when there is one; CUDA asked for without one falls back to
    the CPU (quietly for lm-eval's own default, which is no request for a GPU)."""
    wanted = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        level = logging.INFO if device == LM_EVAL_DEFAULT_DEVICE else logging.WARNING
        log.log(level, "device=%s but CUDA is not available; running on cpu", wanted)
        wanted = "cpu"
    return torch.device(wanted)


def split_over_devices(parallel: Parallel | None, processes: int) -> dict[str, Any]:
    """``load_model``'s arguments that spread the blocks over the host's GPUs (``parallelize=True``;
    none without it), refused under data parallelism, whose processes each hold a whole model."""
    if parallel is None:
        return {}
    if processes > 1:
        raise ValueError(f"parallelize=True splits one model over the host's GPUs, but {processes} data-parallel "
                         "processes each want a whole model on the same GPUs: run one process (python -m lm_eval, "
                         "no accelerate launch) or drop parallelize")
    return {"max_memory": parallel.max_memory(), "device_map": parallel.device_map}


def device_names(device: torch.device, block_devices: tuple[torch.device, ...] | None) -> str:
    """Where the model runs, as the speed figures name it: the GPU's name (or "cpu"); for a model split
    over devices, each device with its number of blocks."""
    def name(d: torch.device) -> str:
        return torch.cuda.get_device_name(d) if d.type == "cuda" else d.type

    if block_devices is None:
        return name(device)
    return ", ".join(f"{d} ({name(d)}): {block_devices.count(d)} blocks" for d in dict.fromkeys(block_devices))


def rolling_windows(requests: list[Instance], encode, prefix_id: int, max_length: int) -> tuple[list, list[int], list]:
    """lm-eval's disjoint rolling windows of each document (one token of context; at most
    ``max_length - 1`` scored tokens each) as loglikelihood items, with the request each belongs to
    and its task."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    windows, owners, tasks = [], [], []
    for i, req in enumerate(requests):
        (text,) = req.args
        for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(encode(text), prefix_id, max_length - 1, 1)):
            windows.append(((text, ""), ctx, cont))
            owners.append(i)
            tasks.append(req.task_name)
    return windows, owners, tasks


def sum_pieces(owners: list[int], scored: list[tuple[float, bool]], n: int) -> list[tuple[float, bool]]:
    """(summed score, every piece greedy) of each of ``n`` requests from the scores of its pieces."""
    totals = [[0.0, True] for _ in range(n)]
    for owner, (score, is_greedy) in zip(owners, scored):
        totals[owner][0] += score
        totals[owner][1] &= bool(is_greedy)
    return [(score, is_greedy) for score, is_greedy in totals]


def fit_context(ctx: list[int], cont: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """The context left-truncated so context + continuation fit ``max_length`` (with a warning)."""
    if len(cont) >= max_length:
        raise ValueError(
            f"loglikelihood: a continuation of {len(cont)} tokens does not fit max_length={max_length}; "
            "raise max_length (up to the model's max_sequence_length)"
        )
    excess = len(ctx) + len(cont) - max_length
    if excess > 0:
        log.warning("context of %d tokens left-truncated by %d to fit max_length=%d", len(ctx), excess, max_length)
        ctx = ctx[excess:]
    return ctx, cont


def largest_batch(forward, mask_id: int, rows_per_request: int, seq_len: int, most: int, device: torch.device) -> int:
    """``batch_size=auto``: the largest number of requests (of ``rows_per_request`` rows of
    ``seq_len`` tokens) whose forward runs out of no memory, probed from ``most`` down as lm-eval's
    HFLM does (accelerate's find_executable_batch_size)."""
    from accelerate.utils import find_executable_batch_size

    @find_executable_batch_size(starting_batch_size=most)
    def probe(batch_size: int) -> int:
        with torch.no_grad():
            forward(torch.full((batch_size * rows_per_request, seq_len), mask_id, device=device))
        return batch_size

    size = probe()
    log.info("batch_size=auto: %d requests per batch", size)
    return size
