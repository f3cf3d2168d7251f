"""Diffusion decoding as Dream's ``diffusion_generate`` (``_sample``) does it, batched.

Start from the prompt followed by ``gen_length`` mask tokens and take ``steps`` denoising steps
over the whole answer (no semi-autoregressive blocks) on the timesteps linspace(1, eps, steps+1).
At step i (t = timesteps[i], s = timesteps[i+1]) every masked position gets a token and a
confidence from its logits; ``origin`` commits each masked position with probability 1 - s/t,
the other algorithms commit the int(M (1 - s/t)) most confident of the M still masked
(everything at the last step): ``maskgit_plus`` ranks by the token's probability, ``topk_margin``
by the margin between the two most likely tokens, ``entropy`` by the negative entropy. With
``alg_temp`` > 0 the committed positions are drawn from softmax(confidence / alg_temp) instead.

Upstream draws its noise from torch's global generator; here, as in generate.py, noise is a
hash of (row seed, step, answer position), so a row decodes the same text in any batch. Greedy
settings (temperature 0, alg_temp 0, any algorithm but ``origin``) use no noise and give
upstream's tokens. Mask tokens inside a prompt stay as they are (upstream would fill them too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .generate import Denoiser
from .noise import noise_keys, uniform_noise

ALGORITHMS = ("origin", "maskgit_plus", "topk_margin", "entropy")


@dataclass(frozen=True)
class DreamGenerationSettings:
    gen_length: int = 256
    steps: int = 256
    alg: str = "entropy"  # Dream's evaluation default
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    alg_temp: float = 0.0
    eps: float = 1e-3

    cfg = 0.0  # no classifier-free guidance in Dream's decoding: one row per request

    @property
    def block_length(self) -> int:
        """The whole answer is one block (for the FLOPs of plain decoding)."""
        return self.gen_length

    def check(self) -> None:
        """Reject settings upstream would fail on or silently misread, naming the fix."""
        for name in ("gen_length", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.alg not in ALGORITHMS:
            raise ValueError(f"alg={self.alg!r}; use one of {', '.join(ALGORITHMS)}")
        if self.temperature < 0 or self.alg_temp < 0:
            raise ValueError(f"temperature={self.temperature} and alg_temp={self.alg_temp} must be >= 0")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]; leave it unset for no nucleus filtering")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1; leave it unset for no top-k filtering")
        if not 0 < self.eps < 1:
            raise ValueError(f"eps={self.eps} must be in (0, 1)")

    @property
    def sampling(self) -> bool:
        """Whether decoding draws noise (and so needs row seeds)."""
        return self.temperature > 0 or self.alg_temp > 0 or (self.alg == "origin" and self.steps > 1)


def transfer_probabilities(steps: int, eps: float) -> list[float]:
    """1 - s/t of each step, in float32 as upstream computes it (the last step commits all: 1)."""
    t = torch.linspace(1, eps, steps + 1)
    return [float(1 - t[i + 1] / t[i]) if i < steps - 1 else 1.0 for i in range(steps)]


def transfer_counts(gen_length: int, steps: int, eps: float) -> list[int]:
    """Tokens committed at each step: int(M (1 - s/t)) of the M still masked, all at the last step
    (upstream's float32 arithmetic; every row has the same M, so the schedule is host-known)."""
    t = torch.linspace(1, eps, steps + 1)
    left, counts = gen_length, []
    for i in range(steps):
        n = int(torch.tensor(float(left)) * (1 - t[i + 1] / t[i])) if i < steps - 1 else left
        counts.append(n)
        left -= n
    return counts


def nucleus(logits: Tensor, top_p: float) -> Tensor:
    """Keep the most likely tokens up to cumulative probability ``top_p`` (the first always),
    the rest set to the dtype's minimum, as upstream's ``top_p_logits``."""
    ordered, order = logits.sort(dim=-1, descending=True)
    beyond = ordered.softmax(-1).cumsum(-1) > top_p
    drop = torch.zeros_like(beyond)
    drop[..., 1:] = beyond[..., :-1]  # a token goes once the ones before it already pass top_p
    return logits.masked_fill(torch.zeros_like(drop).scatter_(-1, order, drop), torch.finfo(logits.dtype).min)


def tokens_and_confidence(logits: Tensor, settings: DreamGenerationSettings, keys: Tensor | None) -> tuple[Tensor, Tensor]:
    """x0 [B, W] and its confidence under ``settings.alg`` (upstream ``sample_tokens``); ``keys``
    [B, W] key the sampling noise when temperature > 0."""
    if settings.temperature > 0:
        logits = logits / settings.temperature
    if settings.top_p is not None and settings.top_p < 1:
        logits = nucleus(logits, settings.top_p)
    if settings.top_k is not None:
        kth = logits.topk(min(settings.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)
    probs = logits.softmax(-1)
    if settings.temperature > 0:  # a draw from probs: Gumbel-max on counter-based uniforms
        x0 = (probs.double() / -torch.log(uniform_noise(keys, probs.shape[-1]))).argmax(-1)
        confidence = probs.gather(-1, x0[..., None]).squeeze(-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if settings.alg == "topk_margin":
        top2 = probs.topk(2, dim=-1).values
        confidence = top2[..., 0] - top2[..., 1]
    elif settings.alg == "entropy":
        confidence = (probs * torch.log(probs + 1e-10)).sum(-1)
    return x0, confidence


@torch.no_grad()
def dream_generate(
    denoise: Denoiser,
    prompt: Tensor,
    attention_mask: Tensor | None,
    settings: DreamGenerationSettings,
    mask_id: int,
    row_seeds: Tensor | None = None,
) -> Tensor:
    """[B, P + gen_length] ids: the (left-padded) prompt followed by the decoded answer.

    ``row_seeds`` [B] int64 key each row's noise; needed when ``settings.sampling``.
    """
    settings.check()
    if settings.sampling and row_seeds is None:
        raise ValueError("temperature > 0, alg_temp > 0 or alg='origin' samples: pass row_seeds, one int64 key per row")
    B, P = prompt.shape
    G = settings.gen_length
    x = torch.full((B, P + G), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :P] = prompt
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, G)], dim=1)
    answer = slice(P, P + G)
    positions = torch.arange(G, device=x.device)
    counts = transfer_counts(G, settings.steps, settings.eps)
    probabilities = transfer_probabilities(settings.steps, settings.eps)
    for step in range(settings.steps):
        if settings.alg != "origin" and counts[step] == 0:
            continue  # upstream's forward changes nothing then; skipping it saves the compute
        logits = denoise(x, attention_mask, answer)  # [B, G, V]
        current = x[:, answer]
        masked = current == mask_id
        token_keys = noise_keys(row_seeds, 0, step, positions) if settings.temperature > 0 else None
        x0, confidence = tokens_and_confidence(logits, settings, token_keys)
        if settings.alg == "origin":
            chosen = uniform_noise(noise_keys(row_seeds, 1, step, positions), 1)[..., 0] < probabilities[step] if (
                step < settings.steps - 1) else torch.ones_like(masked)
        else:
            confidence = torch.where(masked, confidence, -torch.inf)
            if settings.alg_temp > 0:  # softmax(confidence / alg_temp) without replacement: Gumbel top-k
                gumbel = -torch.log(-torch.log(uniform_noise(noise_keys(row_seeds, 1, step, positions), 1)[..., 0]))
                confidence = (confidence / settings.alg_temp).double().log_softmax(-1) + gumbel
            # Ranked over the whole canvas as upstream does: torch.topk orders ties (e.g. several
            # confidences of exactly 1 under top_p) by the row's length, so a window could differ.
            canvas = torch.cat([confidence.new_full((B, P), -torch.inf), confidence], dim=1)
            top = canvas.topk(counts[step], dim=1).indices - P
            chosen = torch.zeros_like(masked).scatter_(1, top, True)
        x[:, answer] = torch.where(chosen & masked, x0, current)
    return x
