"""Diffusion decoding as upstream LLaDA ``generate()`` does it, batched.

Start from the prompt followed by ``gen_length`` mask tokens; split the answer into semi-
autoregressive blocks; in each block spend ``steps / num_blocks`` denoising steps, each of which
predicts every masked position and commits the most confident ones (``low_confidence``) or
random ones (``random``). Every row commits the same number of tokens per step, so one ``topk``
over the batch replaces upstream's per-row loop with the same result. Sampling noise (temperature
> 0, random remasking) is a hash of (row seed, step, answer position), not a draw from a shared
generator, so a row decodes the same text whatever batch it sits in.

Accelerated decoding follows Fast-dLLM (``llada/generate.py``). ``cache="prefix"`` or ``"dual"``:
each semi-autoregressive block starts with one full forward that decodes and fills a key/value
cache, and its later steps compute only the block and everything after it (prefix) or the block
alone (dual), attending to the cached rest. ``threshold=t``: each step commits every masked token
of the block whose confidence reaches t, and at least the most confident one, until the block is
done; rows that finish early stop changing while the others go on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.execution import KVCache
from .noise import noise_keys, uniform_noise

REMASKING = ("low_confidence", "random")
CACHES = ("none", "prefix", "dual")
DECIDE_EVERY = ("block", "step")


class Denoiser(Protocol):
    def __call__(
        self, ids: Tensor, attention_mask: Tensor | None, logits_at: slice | Tensor | None,
        cache: KVCache | None = None, window: slice | None = None,
    ) -> Tensor:
        """Logits at ``logits_at`` among the computed positions (None: all; a slice of columns).
        With ``cache`` and no ``window``: a full forward that fills the cache; with a ``window`` of
        canvas columns: only those are computed, the rest read from the cache."""
        ...


@dataclass(frozen=True)
class GenerationSettings:
    gen_length: int = 256
    steps: int = 256
    block_length: int = 256
    cfg: float = 0.0
    remasking: str = "low_confidence"
    temperature: float = 0.0
    cache: str = "none"
    threshold: float | None = None  # None: the fixed schedule
    decide_every: str = "block"  # cached: skip decisions of the block's fill reused ("block") or asked anew ("step")

    def check(self) -> None:
        """Reject settings upstream would assert on, naming the argument and the fix."""
        for name in ("gen_length", "steps", "block_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.gen_length % self.block_length:
            raise ValueError(
                f"gen_length={self.gen_length} is not a multiple of block_length={self.block_length}; "
                "choose block_length dividing gen_length"
            )
        num_blocks = self.gen_length // self.block_length
        if self.steps % num_blocks:
            raise ValueError(
                f"steps={self.steps} cannot be split evenly over {num_blocks} blocks "
                f"(gen_length {self.gen_length} / block_length {self.block_length}); use a multiple of {num_blocks}"
            )
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking={self.remasking!r}; use one of {', '.join(REMASKING)}")
        if self.cfg < 0 or self.temperature < 0:
            raise ValueError(f"cfg={self.cfg} and temperature={self.temperature} must be >= 0")
        if self.cache not in CACHES:
            raise ValueError(f"cache={self.cache!r}; use one of {', '.join(CACHES)}")
        if self.decide_every not in DECIDE_EVERY:
            raise ValueError(f"decide_every={self.decide_every!r}; use one of {', '.join(DECIDE_EVERY)}")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise ValueError(f"threshold={self.threshold} must be in (0, 1]; leave it unset for the fixed schedule")

    @property
    def fast_dllm(self) -> bool:
        """Cached or threshold decoding: Fast-dLLM's rules (float64 confidences, steps until done)."""
        return self.cache != "none" or self.threshold is not None


def guided_logits(
    denoise: Denoiser, ids: Tensor, attention_mask: Tensor | None, prompt_mask: Tensor,
    logits_at: slice | Tensor | None, cfg: float, mask_id: int,
    cache: KVCache | None = None, window: slice | None = None,
) -> Tensor:
    """Logits, with LLaDA's unsupervised classifier-free guidance when cfg > 0: the same rows with the
    prompt masked give the unconditional logits, mixed as un + (cfg + 1) (cond - un). (With a cache,
    the unconditional rows keep their own cache rows.)"""
    cached = {} if cache is None else {"cache": cache, "window": window}
    if cfg == 0:
        return denoise(ids, attention_mask, logits_at, **cached)
    unconditional = torch.where(prompt_mask, mask_id, ids)
    both_mask = None if attention_mask is None else attention_mask.repeat(2, 1)
    both_at = logits_at if not isinstance(logits_at, Tensor) else torch.cat([logits_at, logits_at + ids.numel()])
    logits, un_logits = denoise(torch.cat([ids, unconditional]), both_mask, both_at, **cached).chunk(2)
    return un_logits + (cfg + 1) * (logits - un_logits)


def transfer_schedule(block_length: int, steps: int) -> list[int]:
    """Tokens committed at each step of a block: equal shares, the remainder spread over the
    first steps (upstream get_num_transfer_tokens; LLaDA's linear noise schedule)."""
    base, remainder = divmod(block_length, steps)
    return [base + (1 if i < remainder else 0) for i in range(steps)]


def add_gumbel_noise(logits: Tensor, temperature: float, keys: Tensor | None) -> Tensor:
    """Gumbel-max sampling in float64 (low precision hurts generation quality, arXiv:2409.02908);
    ``keys`` [B, W] give each position its uniforms over the vocabulary."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = uniform_noise(keys, logits.shape[-1])
    return logits.exp() / (-torch.log(noise)) ** temperature


@torch.no_grad()
def generate(
    denoise: Denoiser,
    prompt: Tensor,
    attention_mask: Tensor | None,
    settings: GenerationSettings,
    mask_id: int,
    row_seeds: Tensor | None = None,
) -> Tensor:
    """[B, P + gen_length] ids: the (left-padded) prompt followed by the decoded answer.

    ``row_seeds`` [B] int64 key each row's sampling noise; needed when temperature > 0 or
    remasking is random (the harness derives them from the seed and the row's prompt).
    """
    settings.check()
    sampling = settings.temperature > 0 or settings.remasking == "random"
    if sampling and row_seeds is None:
        raise ValueError("temperature > 0 or remasking='random' samples: pass row_seeds, one int64 key per row")
    B, P = prompt.shape
    G, block_length = settings.gen_length, settings.block_length
    x = torch.full((B, P + G), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :P] = prompt
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, G)], dim=1)
    prompt_index = x != mask_id
    # Positions before the current block are final unless the prompt itself holds mask tokens;
    # then (as upstream) they stay candidates in every full forward and its logits start at 0.
    prompt_has_masks = bool((prompt == mask_id).any())  # sync: once per call
    num_blocks = G // block_length
    schedule = transfer_schedule(block_length, settings.steps // num_blocks)
    cache = None if settings.cache == "none" else KVCache(
        reuse_decisions=settings.decide_every == "block", write_skipped=settings.decide_every == "step"
    )
    # Fast-dLLM ends a block when it has no mask left, after at least one cached forward; with
    # the fixed schedule that is known up front: after the last step that commits a token.
    fixed_steps = len(schedule) if not settings.fast_dllm else max(
        max(i for i, n in enumerate(schedule) if n) + 1, 1 if cache is None else 2
    )
    for block in range(num_blocks):
        start, end = P + block * block_length, P + (block + 1) * block_length
        step = 0
        while True:
            if step == 0 or cache is None:  # a full forward (it fills the cache when there is one)
                columns, window = slice(0 if prompt_has_masks else start, end), None
            else:  # later steps of a cached block: the block (dual) or the block and what follows (prefix)
                columns = slice(start, end)
                window = columns if settings.cache == "dual" else slice(start, None)
            logits_at = columns if window is None else slice(0, block_length)
            logits = guided_logits(denoise, x, attention_mask, prompt_index, logits_at, settings.cfg, mask_id, cache, window)
            num_transfer = schedule[step] if settings.threshold is None and step < len(schedule) else 0
            # Noise keys: (block, step within it), which every row shares whatever batch it sits in.
            noise = None if not sampling else (row_seeds, (block << 20) + step, torch.arange(columns.start - P, end - P, device=x.device))
            x[:, columns] = unmask(x[:, columns], logits, num_transfer, settings, mask_id, noise)
            step += 1
            if settings.threshold is None:
                if step == fixed_steps:
                    break
            elif step > (cache is not None) and not bool((x[:, start:end] == mask_id).any()):  # sync: once per step
                break
    return x


def unmask(
    current: Tensor, logits: Tensor, num_transfer: int, settings: GenerationSettings, mask_id: int,
    noise: tuple[Tensor, int, Tensor] | None,
) -> Tensor:
    """``current`` [B, W] with some masked positions filled from ``logits`` [B, W, V]: the
    ``num_transfer`` most confident of each row, or (threshold) every one at least as confident as
    the threshold and at least the most confident one. ``noise`` (row seeds, step, answer
    positions [W]) keys the sampling noise."""
    masked = current == mask_id
    row_seeds, step, positions = (None, 0, None) if noise is None else noise
    token_keys = noise_keys(row_seeds, 0, step, positions) if settings.temperature > 0 else None
    x0 = add_gumbel_noise(logits, settings.temperature, token_keys).argmax(-1)
    if settings.remasking == "low_confidence":
        p = F.softmax(logits.double() if settings.fast_dllm else logits, dim=-1)
        confidence = p.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    else:
        confidence = uniform_noise(noise_keys(row_seeds, 1, step, positions), 1)[..., 0]
    confidence = torch.where(masked, confidence, -torch.inf)
    if settings.threshold is None:
        chosen = torch.zeros_like(masked).scatter_(1, confidence.topk(num_transfer, dim=1).indices, True)
    else:
        chosen = confidence >= settings.threshold
        top = confidence.topk(1, dim=1).indices
        chosen.scatter_(1, top, True)
    return torch.where(chosen & masked, x0, current)

