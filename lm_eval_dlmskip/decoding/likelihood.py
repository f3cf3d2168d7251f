"""Monte-Carlo masked log-likelihood of an answer given a prompt, as upstream LLaDA estimates it.

For an answer of T tokens each sample masks l of them, l stratified over a mini-batch of
``mc_batch`` samples (l_i = k + i T/b wrapped, k ~ U{1..T}) and the positions a uniform subset;
the prompt is never masked. A sample scores sum(CE over masked positions) * T / l, and the
estimate is minus the mean over ``mc_num`` samples: a lower bound on log p(answer | prompt)
(LLaDA Eq. 14; ``get_log_likelihood.py``). A one-token answer has a single mask pattern, so one
sample is exact (LLaDA App. B.5). Rows of many requests share each forward pass.

Dream's evaluation (its lm-eval harness, ``_eval_target_nll_mc``) estimates the same bound with
another forward process: per group of b samples t_i = (u + i/b) mod 1 (one u ~ U[0,1) per group),
p_i = (1 - eps) t_i + eps, each answer token masked independently with probability p_i, and a
sample scores sum(CE over masked positions) / p_i. Its answer ends with an EOS token that is
never masked. Only the mask sampler differs (``estimator="dream"``); rows, batching and the
per-request generators are shared. Upstream draws from the global RNG; here each request has its
own generator (as for LLaDA), so a score does not depend on batching.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .generate import Denoiser, guided_logits


@dataclass(frozen=True)
class LikelihoodSettings:
    mc_num: int = 128
    mc_batch: int = 16  # samples stratified together (upstream's mini-batch), and per forward
    cfg: float = 0.0
    estimator: str = "llada"  # the forward process: a key of ESTIMATORS
    sampling_eps: float = 1e-3  # Dream: the smallest masking probability

    def check(self) -> None:
        for name in ("mc_num", "mc_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.mc_num % self.group_size:
            raise ValueError(f"mc_num={self.mc_num} is not a multiple of mc_batch={self.mc_batch}")
        if self.cfg < 0:
            raise ValueError(f"cfg={self.cfg} must be >= 0")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator={self.estimator!r}; use one of {', '.join(ESTIMATORS)}")
        if self.estimator == "dream" and self.cfg:
            raise ValueError(f"cfg={self.cfg}: Dream's likelihood has no classifier-free guidance; leave cfg unset")
        if not 0 < self.sampling_eps < 1:
            raise ValueError(f"sampling_eps={self.sampling_eps} must be in (0, 1)")

    @property
    def group_size(self) -> int:
        return min(self.mc_batch, self.mc_num)


def request_generator(seed: int, prompt: list[int], answer: list[int]) -> torch.Generator:
    """A CPU generator keyed by (seed, request), so masks never depend on batching or rank."""
    digest = hashlib.sha256(f"{seed}|{prompt}|{answer}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def stratified_counts(answer_len: int, settings: LikelihoodSettings, generator: torch.Generator) -> Tensor:
    """Masked-token counts [mc_num]: per group of b samples, l_i = k + round(i T / b) wrapped into 1..T.

    Upstream rounds k + i T / b as a whole with round-half-to-even, so at exact halves l_i depends
    on the parity of k and its marginal is not uniform (T=3, b=16 gives l=1,2,3 with weights
    17:16:15 over the 3 x 16 choices of k and slot), which biases the estimate. Rounding the offset alone keeps the stratification and
    makes every sample's l exactly uniform on 1..T, as the estimator intends.
    """
    b, T = settings.group_size, answer_len
    k = torch.randint(1, T + 1, (settings.mc_num // b, 1), generator=generator)
    offsets = (2 * torch.arange(b) * T + b) // (2 * b)  # round-half-up of i T / b, exact in integers
    return ((k - 1 + offsets) % T + 1).flatten()


def sample_masks(answer_len: int, settings: LikelihoodSettings, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Mask patterns [n, T] bool (a uniform subset of each stratified size) and their sizes [n]."""
    if answer_len == 1:
        return torch.ones(1, 1, dtype=torch.bool), torch.ones(1, dtype=torch.long)
    count = stratified_counts(answer_len, settings, generator)
    rank = torch.rand(len(count), answer_len, generator=generator).argsort(1).argsort(1)  # random permutation
    return rank < count[:, None], count


def dream_masks(answer_len: int, settings: LikelihoodSettings, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Dream's forward process: mask patterns [n, T] bool and each sample's masking probability
    [n] float32 (stratified per group of b: t_i = (u + i/b) mod 1, p = (1 - eps) t + eps, in
    float32 as upstream). The last position, the EOS Dream appends to every answer, stays unmasked."""
    b = settings.group_size
    t = (torch.rand(settings.mc_num // b, 1, generator=generator) + torch.arange(b).float() / b) % 1
    p_mask = ((1 - settings.sampling_eps) * t + settings.sampling_eps).flatten()
    pattern = torch.rand(len(p_mask), answer_len, generator=generator) < p_mask[:, None]
    pattern[:, -1] = False
    return pattern, p_mask


def weighted_masks(answer_len: int, settings: LikelihoodSettings, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Mask patterns [n, T] and the weight [n] of each masked position's cross-entropy in its
    sample's score: T / l for LLaDA, 1 / p for Dream."""
    if settings.estimator == "dream":
        pattern, p_mask = dream_masks(answer_len, settings, generator)
        return pattern, 1 / p_mask
    pattern, count = sample_masks(answer_len, settings, generator)
    return pattern, answer_len / count.float()


ESTIMATORS = ("llada", "dream")


@dataclass
class _Rows:
    """The rows of one forward pass: ids, which positions to score, and their weights."""

    ids: Tensor  # [N, L]
    attention_mask: Tensor | None  # [N, L], None when no row is padded
    prompt_mask: Tensor  # [N, L] bool: prompt positions (masked out for the CFG pass)
    positions: Tensor  # [M] flat indices of masked answer positions
    targets: Tensor  # [M] their true tokens
    weights: Tensor  # [M] their row's weight (T / l, or 1 / p for Dream)
    owner: Tensor  # [M] index of the request each position belongs to
    row_owner: Tensor  # [N] index of the request each row belongs to


def _build_rows(
    prompts: list[list[int]],
    answers: list[list[int]],
    masks: list[tuple[Tensor, Tensor]],  # per request: patterns [n, T] and weights [n]
    group: int,
    settings: LikelihoodSettings,
    mask_id: int,
    pad_id: int,
) -> _Rows | None:
    """Rows for mini-batch ``group`` of every request that still has one, right-padded."""
    rows, row_masks, row_prompt, owners, weights = [], [], [], [], []
    b = settings.group_size
    for r, (prompt, answer, (pattern, weight)) in enumerate(zip(prompts, answers, masks)):
        chunk = slice(group * b, (group + 1) * b)
        for m, w in zip(pattern[chunk], weight[chunk]):
            full = torch.cat([torch.zeros(len(prompt), dtype=torch.bool), m])
            rows.append(torch.tensor(prompt + answer))
            row_masks.append(full)
            row_prompt.append(len(prompt))
            owners.append(r)
            weights.append(w)
    if not rows:
        return None
    N, L = len(rows), max(len(r) for r in rows)
    ids = torch.full((N, L), pad_id, dtype=torch.long)
    is_masked = torch.zeros(N, L, dtype=torch.bool)
    prompt_mask = torch.zeros(N, L, dtype=torch.bool)
    attention = torch.zeros(N, L, dtype=torch.long)
    for i, (row, m, p) in enumerate(zip(rows, row_masks, row_prompt)):
        ids[i, : len(row)] = row
        is_masked[i, : len(row)] = m
        prompt_mask[i, :p] = True
        attention[i, : len(row)] = 1
    targets = ids[is_masked]
    positions = is_masked.flatten().nonzero().squeeze(1)
    per_position_row = positions // L
    row_owner = torch.tensor(owners)
    return _Rows(
        ids=torch.where(is_masked, mask_id, ids),
        attention_mask=None if bool(attention.all()) else attention,
        prompt_mask=prompt_mask,
        positions=positions,
        targets=targets,
        weights=torch.stack(weights).float()[per_position_row],
        owner=row_owner[per_position_row],
        row_owner=row_owner,
    )


def _to(rows: _Rows, device: torch.device) -> _Rows:
    move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
    return _Rows(**{k: move(v) for k, v in vars(rows).items()})


@torch.no_grad()
def mc_loglikelihood(
    denoise: Denoiser,
    prompts: list[list[int]],
    answers: list[list[int]],
    settings: LikelihoodSettings,
    mask_id: int,
    pad_id: int,
    generators: list[torch.Generator],
    device: torch.device,
    on_rows=None,
    masks: list[tuple[Tensor, Tensor]] | None = None,
) -> list[float]:
    """Estimates of log p(answer | prompt) for a batch of requests, one forward per mini-batch round.

    ``on_rows(row_owner)`` is called before each forward with the request index of every row
    (the harness uses it to attribute compute to tasks). ``masks`` (patterns, weights) per request
    replace the sampled ones (tests replay upstream's draws with them).
    """
    settings.check()
    if masks is None:
        masks = [weighted_masks(len(a), settings, g) for a, g in zip(answers, generators)]
    totals = torch.zeros(len(prompts), dtype=torch.float32, device=device)
    samples = torch.tensor([len(c) for _, c in masks], dtype=torch.float32, device=device)
    rounds = -(-max(len(c) for _, c in masks) // settings.group_size)  # ceil
    for group in range(rounds):
        built = _build_rows(prompts, answers, masks, group, settings, mask_id, pad_id)
        if built is None:
            break
        rows = _to(built, device)
        if on_rows is not None:
            on_rows(rows.row_owner.repeat(2) if settings.cfg > 0 else rows.row_owner)
        logits = guided_logits(denoise, rows.ids, rows.attention_mask, rows.prompt_mask, rows.positions, settings.cfg, mask_id)
        loss = F.cross_entropy(logits.float(), rows.targets, reduction="none") * rows.weights
        totals.index_add_(0, rows.owner, loss)
    return (-totals / samples).tolist()  # sync: once per batch of requests


@torch.no_grad()
def greedy_matches(
    denoise: Denoiser,
    prompts: list[list[int]],
    answers: list[list[int]],
    cfg: float,
    mask_id: int,
    pad_id: int,
    device: torch.device,
) -> list[bool]:
    """Whether unmasking the answer one most-confident token at a time reproduces it exactly
    (upstream ``suffix_greedy_prediction``; costs one forward per answer token)."""
    N, L = len(prompts), max(len(p) + len(a) for p, a in zip(prompts, answers))
    ids = torch.full((N, L), pad_id, dtype=torch.long)
    target = torch.full((N, L), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros(N, L, dtype=torch.bool)
    attention = torch.zeros(N, L, dtype=torch.long)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        ids[i, : len(p) + len(a)] = torch.tensor(p + [mask_id] * len(a))
        target[i, : len(p) + len(a)] = torch.tensor(p + a)
        prompt_mask[i, : len(p)] = True
        attention[i, : len(p) + len(a)] = 1
    ids, target, prompt_mask = ids.to(device), target.to(device), prompt_mask.to(device)
    attention_mask = None if bool(attention.all()) else attention.to(device)
    rows = torch.arange(N, device=device)
    for _ in range(max(len(a) for a in answers)):
        masked = ids == mask_id
        logits = guided_logits(denoise, ids, attention_mask, prompt_mask, None, cfg, mask_id)
        x0 = logits.argmax(-1)
        confidence = F.softmax(logits.float(), dim=-1).gather(-1, x0.unsqueeze(-1)).squeeze(-1)
        best = torch.where(masked, confidence, -torch.inf).argmax(1)  # [N]
        still = masked[rows, best]  # rows whose answer is complete change nothing
        ids[rows, best] = torch.where(still, x0[rows, best], ids[rows, best])
    return (ids == target).all(1).tolist()
