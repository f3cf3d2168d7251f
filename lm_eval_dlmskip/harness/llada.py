"""``lm_eval --model llada_skip``: LLaDA scored and decoded as upstream does (Monte-Carlo likelihood
with optional CFG; semi-autoregressive diffusion generation, Fast-dLLM's caches and threshold), with
blocks skipped. The request handling is base.py's."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..decoding.generate import generate
from ..decoding.likelihood import LikelihoodSettings
from .base import DiffusionSkipLM
from .gen_kwargs import LLADA


class LLaDASkipLM(DiffusionSkipLM):
    """LLaDA in lm-eval: Monte-Carlo likelihood, diffusion generation, static/profile/random/routed
    skipping. Blocks are 0-based (the papers' k=3 set {5,7,9} is ``skip_layers=[4,6,8]``)."""

    family = "llada"
    decoding = LLADA

    @classmethod
    def likelihood_settings(cls, args: Mapping[str, Any]) -> LikelihoodSettings:
        return LikelihoodSettings(mc_num=args["mc_num"], mc_batch=args["mc_batch"], cfg=float(args["cfg"] or 0.0))

    def decode(self, denoise, ids: torch.Tensor, attention_mask: torch.Tensor | None, settings, row_seeds) -> torch.Tensor:
        return generate(denoise, ids, attention_mask, settings, self.mask_id, row_seeds)[:, ids.shape[1] :]
