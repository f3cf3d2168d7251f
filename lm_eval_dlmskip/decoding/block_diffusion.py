"""Block diffusion decoding as LLaDA2's ``generate`` does it, batched, with an exact KV cache.

The canvas is the prompt followed by masks, up to a whole number of blocks of ``block_length``
counted from the prompt's first token (so the prompt's last block also holds the first answer
tokens). Attention is block-causal: a block sees itself and the blocks before it. Blocks are
decoded in order, each in at most ``steps`` steps; a step predicts the block's masked positions
and commits every one whose confidence (the softmax probability of the predicted token, in
float32) exceeds ``threshold``, or, when fewer than the step's quota do, the quota's most
confident ones. The quotas split ``block_length`` evenly over the steps, the remainder to the
first ones. A row ends after a block that holds an EOS; its answer is cut after the first EOS. LLaDA2.1's
token editing (``editing_threshold``) also rewrites decoded tokens of the current block whose new
prediction is confident enough, commits ``num_to_transfer`` masks per step, and ends a block when a
step finds nothing to commit or edit (``refine_block``).

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

from ..common.families import FAMILIES
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
    editing_threshold: float | None = None  # LLaDA2.1's token editing (its default is 0.9); None: LLaDA2.0's decoding
    max_post_steps: int = 16  # LLaDA2.1: steps of editing after a block has no mask left
    num_to_transfer: int = 1  # LLaDA2.1: masked positions committed per step (more when above the threshold)

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
        if self.editing_threshold is not None and not 0 < self.editing_threshold:
            raise ValueError(f"editing_threshold={self.editing_threshold} must be > 0 (or unset: no token editing)")
        for name in ("max_post_steps", "num_to_transfer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (name == "num_to_transfer"):
                raise ValueError(f"{name}={value!r} must be an integer >= {int(name == 'num_to_transfer')}")

    @property
    def steps_per_block(self) -> int:
        return min(self.steps, self.gen_length // self.minimal_topk)


def attention_block_length(family: str, block_length: int | None, option: str = "--block-length") -> int | None:
    """The block length a family's forwards attend block-causally in: LLaDA2's ``block_length``,
    else its decoding default (32), so that training and calibration see the attention decoding
    uses; None for a family that attends to every position, which refuses a given one (``option``
    names it in the message: it would change nothing)."""
    if family != "llada2":
        if block_length is not None:
            raise ValueError(f"{option}={block_length}: {FAMILIES[family]} attends to every position; a block length "
                             "of attention applies to LLaDA2 (block-causal) alone, leave it out")
        return None
    if block_length is None:
        return BlockDiffusionSettings.block_length
    if isinstance(block_length, bool) or not isinstance(block_length, int) or block_length < 1:
        raise ValueError(f"{option}={block_length!r} must be a positive integer")
    return block_length


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


class BlockForwards:
    """The forwards of one batch: the current block's logits, computed from the canvas as it is;
    with the cache, the first forward of a block also recomputes the block before it (final now)."""

    def __init__(self, denoise: Denoiser, x: Tensor, attention_mask: Tensor | None, block_length: int, cached: bool):
        self.denoise, self.x, self.attention_mask, self.bl = denoise, x, attention_mask, block_length
        self.cache = KVCache() if cached else None
        self.stale = 0  # first column whose cached keys and values are not final

    def logits(self, start: int, end: int) -> Tensor:
        if self.cache is None:  # upstream's way: the prefix up to the block's end, recomputed
            mask = None if self.attention_mask is None else self.attention_mask[:, :end]
            return self.denoise(self.x[:, :end], mask, slice(start, end), block_length=self.bl)
        logits = self.denoise(self.x, self.attention_mask, slice(start - self.stale, end - self.stale), cache=self.cache,
                              window=slice(self.stale, end), block_length=self.bl)
        self.stale = start
        return logits


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
    forwards = BlockForwards(denoise, x, None if bool(real.all()) else real, bl, settings.cache == "blocks")
    columns = torch.arange(x.shape[1], device=device)
    in_answer = (columns[None] >= torch.tensor(canvas.answer_start, device=device)[:, None]) & real.bool()  # [B, L]
    active = torch.ones(len(prompts), dtype=torch.bool, device=device)
    decode_block = fill_block if settings.editing_threshold is None else refine_block
    for block in range(canvas.first, canvas.blocks):
        start, end = block * bl, (block + 1) * bl
        noise = None if settings.temperature == 0 else (row_seeds, block, columns[start:end])
        decode_block(forwards, start, end, active, in_answer, settings, mask_id, eos_id, noise)
        answer_so_far = in_answer[:, :end]
        if settings.editing_threshold is None:  # LLaDA2.0: a row ends after a block with an EOS
            active &= ~((x[:, :end] == eos_id) & answer_so_far).any(1)
        elif settings.eos_early_stop:  # LLaDA2.1: after a block, when the answer so far is decoded and holds an EOS
            active &= ~(((x[:, :end] == eos_id) & answer_so_far).any(1) & ~((x[:, :end] == mask_id) & answer_so_far).any(1))
        if not bool(active.any()):  # sync: once per block
            break
    return cut_answers(x, canvas.answer_start, settings.gen_length, eos_id)


def fill_block(forwards: BlockForwards, start: int, end: int, active: Tensor, in_answer: Tensor,
               settings: BlockDiffusionSettings, mask_id: int, eos_id: int, noise: tuple | None) -> None:
    """LLaDA2.0: up to ``steps`` steps, each committing the quota's or the threshold's positions;
    decoded tokens stay. ``active`` rows only; with ``eos_early_stop`` a row whose answer is
    decided up to an EOS ends at once."""
    x = forwards.x
    for step, quota in enumerate(transfer_schedule(settings.block_length, settings.steps_per_block)):
        masked = (x[:, start:end] == mask_id) & active[:, None]
        if not bool(masked.any()):  # sync: once per step
            break
        x0, p = sample(forwards.logits(start, end), settings, step_noise(noise, step))
        commit = choose(p, masked, quota, settings.threshold)
        x[:, start:end] = torch.where(commit, x0, x[:, start:end])
        if settings.eos_early_stop:  # upstream looks after a step that committed an EOS
            active &= ~((commit & (x0 == eos_id)).any(1) & decided_to_eos(x, in_answer, mask_id, eos_id, end))


def refine_block(forwards: BlockForwards, start: int, end: int, active: Tensor, in_answer: Tensor,
                 settings: BlockDiffusionSettings, mask_id: int, eos_id: int, noise: tuple | None) -> None:
    """LLaDA2.1: each step commits ``num_to_transfer`` masked positions (or all above the
    threshold) and edits decoded answer tokens of the block whose new prediction is more confident
    than ``editing_threshold``; a row's block ends at a step that found no mask and edited
    nothing, or after ``max_post_steps`` steps without masks. ``steps`` plays no part."""
    x = forwards.x
    editable = in_answer[:, start:end]
    post_steps = torch.zeros_like(active, dtype=torch.long)
    live = active.clone()
    step = 0
    while True:
        current = x[:, start:end]
        masked = (current == mask_id) & live[:, None]
        post_steps += live & ~masked.any(1)
        live &= post_steps <= settings.max_post_steps
        if not bool(live.any()):  # sync: once per step
            return
        x0, p = sample(forwards.logits(start, end), settings, step_noise(noise, step))
        commit = choose(p, masked, settings.num_to_transfer, settings.threshold)
        edits = editable & live[:, None] & (current != mask_id) & (p > settings.editing_threshold) & (x0 != current)
        x[:, start:end] = torch.where(commit | edits, x0, current)
        live &= masked.any(1) | edits.any(1)
        step += 1


def step_noise(noise: tuple | None, step: int) -> Tensor | None:
    """The sampling noise keys of one step of a block: (row seed, block and step, position)."""
    if noise is None:
        return None
    row_seeds, block, positions = noise
    return noise_keys(row_seeds, 0, (block << 20) + step, positions)


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
