"""Block diffusion decoding as LLaDA2's ``generate`` does it, batched, with an exact KV cache.

The canvas is the prompt followed by masks, up to a whole number of blocks of ``block_length``
counted from the prompt's first token (so the prompt's last block also holds the first answer
tokens). Attention is block-causal: a block sees itself and the blocks before it. Blocks are
decoded in order, each in at most ``steps`` steps; a step predicts the block's masked positions
and commits every one whose confidence (the softmax probability of the predicted token, in
float32) exceeds ``threshold``, or, when fewer than the step's quota do, the quota's most
confident ones. The quotas split ``block_length`` evenly over the steps, the remainder to the
first ones. A row ends after a block that holds an EOS; its answer is cut after the first EOS.

Upstream recomputes the prompt and every finished block at every step. Under the block-causal
mask finished blocks never change, so here the first forward of a block computes the previous
block (now final) and this one, and later steps compute only this block, attending to the cached
keys and values: the same tokens, exactly (``cache="blocks"``; ``"none"`` recomputes as upstream).

Batching: a row's blocks are counted from its own first token, so each prompt is left-padded by a
whole number of blocks such that every row starts decoding at the same column; a row with fewer
blocks than another has no positions in the last one. Sampling noise (temperature > 0) is a hash of
(row seed, block, step, position), so a row decodes the same text in any batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..models.execution import KVCache
from .generate import Denoiser, transfer_schedule
from .noise import noise_keys, uniform_noise

CACHES = ("blocks", "none")


@dataclass(frozen=True)
class BlockDiffusionSettings:
    gen_length: int = 256
    block_length: int = 32
    steps: int = 32  # per block (capped at gen_length // minimal_topk, as upstream)
    threshold: float = 0.95  # commit every masked position more confident than this (>= 1: the quotas alone)
    minimal_topk: int = 1
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    eos_early_stop: bool = False  # end a row as soon as its answer up to an EOS is decoded (saves forwards)
    cache: str = "blocks"

    cfg = 0.0  # no classifier-free guidance: one row per request

    def check(self) -> None:
        """Reject settings upstream would fail on, naming the argument and the fix."""
        for name in ("gen_length", "block_length", "steps", "minimal_topk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.minimal_topk > self.gen_length:
            raise ValueError(f"minimal_topk={self.minimal_topk} exceeds gen_length={self.gen_length}: no step would run")
        if not 0 < self.threshold:
            raise ValueError(f"threshold={self.threshold} must be > 0 (1.0 or more: commit the step quotas alone)")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1")
        if self.cache not in CACHES:
            raise ValueError(f"cache={self.cache!r}; use one of {', '.join(CACHES)}")

    @property
    def steps_per_block(self) -> int:
        return min(self.steps, self.gen_length // self.minimal_topk)


@dataclass(frozen=True)
class Canvas:
    """The block-aligned batch layout: row r's prompt starts at ``pad[r]`` (a whole number of
    blocks) and its blocks end at ``end[r]``; every row decodes from block ``first`` on."""

    ids: Tensor  # [B, L] prompt, masks, padding
    real: Tensor  # [B, L] long: 1 at the row's own positions (prompt, answer, its last block's tail)
    answer_start: list[int]  # canvas column of each row's first answer token
    first: int  # the first block any row decodes
    blocks: int  # blocks of the canvas


def lay_out(prompts: list[list[int]], gen_length: int, block_length: int, mask_id: int, pad_id: int,
            device: torch.device) -> Canvas:
    """Each prompt left-padded by whole blocks so that all rows start decoding in one block."""
    firsts = [len(p) // block_length for p in prompts]
    first = max(firsts)
    pads = [(first - f) * block_length for f in firsts]
    ends = [pad + -(-(len(p) + gen_length) // block_length) * block_length for p, pad in zip(prompts, pads)]
    L = max(ends)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    real = torch.zeros(len(prompts), L, dtype=torch.long)
    for r, (prompt, pad, end) in enumerate(zip(prompts, pads, ends)):
        ids[r, pad : pad + len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        ids[r, pad + len(prompt) : end] = mask_id
        real[r, pad:end] = 1
    starts = [pad + len(p) for p, pad in zip(prompts, pads)]
    return Canvas(ids.to(device), real.to(device), starts, first, L // block_length)


def sample(logits: Tensor, settings: BlockDiffusionSettings, keys: Tensor | None) -> tuple[Tensor, Tensor]:
    """Predicted tokens [B, W] and their probabilities (float32): the argmax at temperature 0, else
    a draw from softmax(logits / temperature) after top-k and top-p filtering (upstream's
    ``_sample_with_temperature_topk_topp``), by Gumbel-max on counter-based uniforms."""
    logits = logits.float()
    if settings.temperature == 0:
        probs = logits.softmax(-1)
        p, x0 = probs.max(-1)
        return x0, p
    logits = logits / settings.temperature
    if settings.top_k is not None:
        kth = logits.topk(min(settings.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if settings.top_p is not None and settings.top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        beyond = ordered.softmax(-1).cumsum(-1) > settings.top_p
        drop = torch.zeros_like(beyond)
        drop[..., 1:] = beyond[..., :-1]  # a token goes once the ones before it pass top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter_(-1, order, drop), -torch.inf)
    probs = logits.softmax(-1)
    x0 = (probs.double() / -torch.log(uniform_noise(keys, probs.shape[-1]))).argmax(-1)
    return x0, probs.gather(-1, x0[..., None]).squeeze(-1)


def choose(confidence: Tensor, masked: Tensor, quota: int, threshold: float) -> Tensor:
    """[B, W] bool: the positions a step commits, per row: every masked one above the threshold
    when at least ``quota`` are, else the ``quota`` most confident masked ones (all when fewer)."""
    confidence = torch.where(masked, confidence, -torch.inf)
    high = confidence > threshold
    if quota == 0:
        return high
    top = torch.zeros_like(masked).scatter_(1, confidence.topk(min(quota, masked.shape[1]), dim=1).indices, True)
    return torch.where((high.sum(1) >= quota)[:, None], high, top & masked)


@torch.no_grad()
def block_generate(
    denoise: Denoiser,
    prompts: list[list[int]],
    settings: BlockDiffusionSettings,
    mask_id: int,
    eos_id: int,
    pad_id: int,
    device: torch.device,
    row_seeds: Tensor | None = None,
) -> Tensor:
    """[B, gen_length] answers, each cut after its first EOS (what follows is EOS)."""
    settings.check()
    if settings.temperature > 0 and row_seeds is None:
        raise ValueError("temperature > 0 samples: pass row_seeds, one int64 key per row")
    bl = settings.block_length
    canvas = lay_out(prompts, settings.gen_length, bl, mask_id, pad_id, device)
    x, real = canvas.ids, canvas.real
    attention_mask = None if bool(real.all()) else real
    B = len(prompts)
    answer = torch.tensor(canvas.answer_start, device=device)
    columns = torch.arange(x.shape[1], device=device)
    in_answer = (columns[None] >= answer[:, None]) & real.bool()  # [B, L]
    schedule = transfer_schedule(bl, settings.steps_per_block)
    cache = KVCache() if settings.cache == "blocks" else None
    active = torch.ones(B, dtype=torch.bool, device=device)
    stale = 0  # first column whose cached keys and values are not final
    for block in range(canvas.first, canvas.blocks):
        start, end = block * bl, (block + 1) * bl
        for step, quota in enumerate(schedule):
            masked = (x[:, start:end] == mask_id) & active[:, None]
            if not bool(masked.any()):  # sync: once per step
                break
            if cache is None:
                logits = denoise(x[:, :end], None if attention_mask is None else attention_mask[:, :end],
                                 slice(start, end), block_length=bl)
            else:
                logits = denoise(x, attention_mask, slice(start - stale, end - stale), cache=cache,
                                 window=slice(stale, end), block_length=bl)
                stale = start
            keys = None if settings.temperature == 0 else noise_keys(row_seeds, 0, (block << 20) + step, columns[start:end])
            x0, p = sample(logits, settings, keys)
            commit = choose(p, masked, quota, settings.threshold)
            x[:, start:end] = torch.where(commit, x0, x[:, start:end])
            if settings.eos_early_stop:  # upstream looks after a step that committed an EOS
                ended = (commit & (x0 == eos_id)).any(1) & decided_to_eos(x, in_answer, mask_id, eos_id, end)
                active &= ~ended
        active &= ~((x[:, :end] == eos_id) & in_answer[:, :end]).any(1)  # a row ends after a block with an EOS
        if not bool(active.any()):  # sync: once per block
            break
    return cut_answers(x, canvas.answer_start, settings.gen_length, eos_id)


def decided_to_eos(x: Tensor, in_answer: Tensor, mask_id: int, eos_id: int, end: int) -> Tensor:
    """[B] rows whose answer holds an EOS with no mask before it (their output is final)."""
    answer = in_answer[:, :end]
    eos = (x[:, :end] == eos_id) & answer
    first = torch.where(eos.any(1), eos.int().argmax(1), end)
    before = torch.arange(end, device=x.device)[None] < first[:, None]
    return eos.any(1) & ~((x[:, :end] == mask_id) & answer & before).any(1)


def cut_answers(x: Tensor, starts: list[int], gen_length: int, eos_id: int) -> Tensor:
    """[B, gen_length]: each row's answer, EOS from its first EOS on."""
    index = torch.tensor(starts, device=x.device)[:, None] + torch.arange(gen_length, device=x.device)
    answers = x.gather(1, index)
    after = (answers == eos_id).int().cumsum(1) > 0
    return answers.masked_fill(after, eos_id)
