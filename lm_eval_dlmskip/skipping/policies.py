"""Skip policies: the one question the model asks before every block, "which rows run block l?".

A policy answers with a Python bool when every row takes the same path (free to branch on, no
device work) or with a ``[B]`` bool tensor when rows differ. Skipping block l for a row means
h_{l+1} = h_l for that row. Blocks are numbered 0-based here; the papers number them 1..N.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import torch
from torch import Tensor

Decision = bool | Tensor  # True/False: every row runs/skips; Tensor [B] bool: per row


@dataclass(frozen=True)
class ForwardBatch:
    """What a policy may look at in one forward pass (built once by the model)."""

    ids: Tensor  # [B, L] token ids
    attention_mask: Tensor | None  # [B, L] 1 = real token, 0 = padding; None = no padding
    masked: Tensor  # [B, L] bool: mask tokens that are not padding (routers vote only here)
    row_keys: Tensor  # [B] int64 hash of each row's real tokens (seeded random choices)
    mask_ratio: Tensor  # [B] float32: the whole row's masking ratio (see ``mask_ratio``)

    @classmethod
    def of(cls, ids: Tensor, attention_mask: Tensor | None, mask_id: int) -> "ForwardBatch":
        masked = ids == mask_id
        if attention_mask is not None:
            masked = masked & attention_mask.bool()
        return cls(ids, attention_mask, masked, row_keys(ids, attention_mask), mask_ratio(masked, attention_mask))

    def window(self, columns: slice) -> "ForwardBatch":
        """The view of a forward that computes only ``columns`` of the canvas (cached decoding);
        row keys and the masking ratio still describe the whole row."""
        mask = None if self.attention_mask is None else self.attention_mask[:, columns]
        return ForwardBatch(self.ids[:, columns], mask, self.masked[:, columns], self.row_keys, self.mask_ratio)

    def to(self, device: torch.device) -> "ForwardBatch":
        """The same batch on ``device`` (a block of a model split over devices)."""
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        return ForwardBatch(self.ids.to(device), mask, self.masked.to(device), self.row_keys.to(device),
                            self.mask_ratio.to(device))


def mask_ratio(masked: Tensor, attention_mask: Tensor | None) -> Tensor:
    """[B] float32: masked positions over real (non-padding) positions of each row: how far its
    denoising has come (1 - ratio of a row's answer is decoded), for routers that see it.

    The denominator is the row's real length because that is all every forward knows alike: a
    training row (prompt + target, right-padded), a likelihood sample, a generation canvas
    (prompt + answer region, left-padded) and a cached window forward (which takes the ratio of
    the whole canvas, not of its window) carry ids and an attention mask, but not where the prompt
    ends. So the ratio is p_mask * T / (P + T) for a prompt of P tokens and an answer of T tokens
    (p_mask of it masked): padding never counts, so a row's ratio does not depend on its batch."""
    real = masked.new_full((masked.shape[0],), masked.shape[1], dtype=torch.float32) if attention_mask is None \
        else attention_mask.sum(1).float()
    return masked.sum(1).float() / real.clamp(min=1)


def row_keys(ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """[B] int64: a hash of each row's real tokens, independent of padding and batch layout, so
    seeded random choices depend on the row's content only, never on which requests share a batch."""
    ids = ids.long()
    real = torch.ones_like(ids) if attention_mask is None else attention_mask.long()
    position = real.cumsum(1) - 1  # 0 at the first real token, whatever the left padding
    weight = (position * 40503 + 1) % _PRIME
    return ((((ids + 7) % _PRIME) * weight % _PRIME) * real).sum(1) % _PRIME


_PRIME = 2_147_483_647  # 2^31 - 1: products of two residues fit in int64


class SkipPolicy(Protocol):
    """Asked once per block and forward: which rows of the batch run block ``layer``?"""

    def rows_to_run(self, layer: int, h: Tensor, batch: ForwardBatch) -> Decision: ...


class NoSkip:
    """Every row runs every block."""

    def rows_to_run(self, layer: int, h: Tensor, batch: ForwardBatch) -> Decision:
        return True

    def __repr__(self) -> str:
        return "NoSkip()"


NO_SKIP = NoSkip()


def check_layers(layers: list[int] | tuple[int, ...] | frozenset[int], n_layers: int | None, name: str) -> None:
    """Validate 0-based block indices with a message that names the argument and the fix
    (``n_layers`` None: before the model is known, everything but the upper bound)."""
    seen: set[int] = set()
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"{name}: {layer!r} is not a block index; give 0-based integers, e.g. {name}=[4,6,8]")
        if n_layers is None and layer < 0:
            raise ValueError(f"{name}: {layer} is out of range; blocks are 0-based (the first is 0)")
        if n_layers is not None and not 0 <= layer < n_layers:
            raise ValueError(
                f"{name}: {layer} is out of range; blocks are 0-based, 0..{n_layers - 1} "
                f"(the papers number them 1..{n_layers})"
            )
        if layer in seen:
            raise ValueError(f"{name}: block {layer} is listed twice")
        seen.add(layer)


@dataclass(frozen=True)
class StaticSkip:
    """A fixed set of 0-based blocks skipped for every row and every forward."""

    layers: frozenset[int]

    def __init__(self, layers) -> None:
        object.__setattr__(self, "layers", frozenset(layers))

    def rows_to_run(self, layer: int, h: Tensor, batch: ForwardBatch) -> Decision:
        return layer not in self.layers


@dataclass(frozen=True)
class RandomSkip:
    """k of the n_layers blocks skipped per row and forward, drawn uniformly (the papers' baseline).

    The draw is a hash of (seed, the row's tokens, block), so it changes at every denoising step
    and Monte-Carlo sample, is reproducible, and does not depend on the batch a row sits in.
    """

    k: int
    n_layers: int
    seed: int = 0

    def rows_to_run(self, layer: int, h: Tensor, batch: ForwardBatch) -> Decision:
        if self.k == 0:
            return True
        scores = _uniform_scores(batch.row_keys, self.n_layers, self.seed)  # [B, n_layers]
        rank = (scores > scores[:, layer : layer + 1]).sum(1)  # 0 = the row's highest score
        return rank >= self.k  # the k highest-scoring blocks of a row are skipped

    def check(self, n_layers: int) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int):
            raise ValueError(f"skip_random: {self.k!r} is not an integer number of blocks")
        if self.n_layers != n_layers:
            raise ValueError(f"skip_random: built for {self.n_layers} blocks, the model has {n_layers}")
        if not 0 <= self.k <= n_layers:
            raise ValueError(f"skip_random: {self.k} blocks cannot be drawn from {n_layers}; give 0..{n_layers}")


def _uniform_scores(row_keys: Tensor, n_layers: int, seed: int) -> Tensor:
    """[B, n_layers] pseudo-random integers from (row key, block, seed): a few MINSTD rounds."""
    layer = torch.arange(n_layers, device=row_keys.device)
    x = (row_keys[:, None] * 69621 + (layer[None, :] + 1) * 48271 + (seed % _PRIME) * 16807 + 1) % _PRIME
    for _ in range(4):
        x = (x * 48271) % _PRIME
        x = (x ^ (x >> 13)) % _PRIME
    return x


@dataclass
class SkipTrace:
    """What one forward pass did, for FLOPs accounting."""

    executed: Tensor  # [B, n_layers] bool: block l ran for row b
    seq_lens: Tensor  # [B] real (non-padding) tokens computed per row
    head_positions: Tensor  # [B] positions whose logits the LM head computed
    masked: Tensor  # [B] masked positions per row among those computed (how far denoising has come)
    routed_layers: int = 0  # blocks whose router was evaluated (its cost goes into FLOPs)
    keys: Tensor | None = None  # [B] real keys attended to; None: the computed tokens themselves
    # [B, n_layers] bool: block l's products ran for row b, where that is not ``executed``: hf_skip
    # runs a layer some rows of the batch skip for every row, keeping the output of the others
    computed: Tensor | None = None
    # [B, n_layers] bool: block l was skipped by row b but its keys and values were computed (a
    # cache fill whose window forwards ask the policy anew, execution.KVCache.write_skipped)
    kv_only: Tensor | None = None

    @staticmethod
    def from_decisions(decisions: list[Decision | list[bool]], batch_size: int, device: torch.device) -> Tensor:
        """Stack per-block decisions (bools, [B] tensors, or per-row lists read back to the host)
        into the [B, n_layers] executed table."""
        if all(isinstance(d, bool) for d in decisions):
            return _constant_row(tuple(decisions), device).expand(batch_size, -1)
        columns = [
            d.to(torch.bool) if isinstance(d, Tensor)
            else torch.tensor(d, device=device) if isinstance(d, list)
            else torch.full((batch_size,), d, device=device)
            for d in decisions
        ]
        return torch.stack(columns, dim=1)


@lru_cache(maxsize=64)
def _constant_row(decisions: tuple[bool, ...], device: torch.device) -> Tensor:
    """The executed row of a host-known decision set, copied to the device once."""
    return torch.tensor(decisions, dtype=torch.bool).to(device)
