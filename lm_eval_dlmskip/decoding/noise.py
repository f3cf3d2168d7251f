"""Sampling noise that depends on a row's content, never on its batch: counter-based uniforms from
a hash of (row seed, stream, step, position, index), as torch computes integer ops alike on CPU
and CUDA. Shared by LLaDA's and Dream's samplers."""

from __future__ import annotations

import torch
from torch import Tensor

# splitmix64 (Steele et al. 2014) on int64 with wrapping arithmetic, as torch computes it on CPU and CUDA.
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_MIX = (0xBF58476D1CE4E5B9 - 2**64, 0x94D049BB133111EB - 2**64)


def _mix(x: Tensor) -> Tensor:
    """splitmix64's finaliser, elementwise and in place on a fresh tensor ([B, W, V] at a time);
    >> is arithmetic in torch, so the shifted-in bits are masked."""
    x ^= (x >> 30) & ((1 << 34) - 1)
    x *= _MIX[0]
    x ^= (x >> 27) & ((1 << 37) - 1)
    x *= _MIX[1]
    x ^= (x >> 31) & ((1 << 33) - 1)
    return x


def noise_keys(row_seeds: Tensor, stream: int, step: int, positions: Tensor) -> Tensor:
    """[B, W] int64 keys of (row seed, stream: 0 tokens / 1 remasking, denoising step, answer position)."""
    row = _mix(_mix(row_seeds * 2 + stream) + step)  # [B]
    return _mix(row[:, None] + positions[None, :] * _GOLDEN)


def uniform_noise(keys: Tensor, n: int) -> Tensor:
    """[*keys.shape, n] float64 uniforms in (0, 1), the counter-based hash of (key, index)."""
    index = torch.arange(1, n + 1, device=keys.device) * _GOLDEN
    bits = _mix(keys[..., None] + index)
    return ((bits >> 11) & ((1 << 53) - 1)).to(torch.float64).add_(0.5).mul_(2.0**-53)
