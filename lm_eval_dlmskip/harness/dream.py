"""``lm_eval --model dream_skip``: Dream-7B scored and decoded as its own evaluation does, with
blocks skipped.

Everything but what differs is base.py's: batching, tokenizer, skip policies, routers,
FLOPs, ranks. What differs: the checkpoint family (a LLaDA checkpoint is refused before its
weights load), decoding (``diffusion_generate``: decoding/dream.py), the likelihood's forward
process and its answer, which ends with an EOS as in Dream's ``_encode_pair`` (decoding/likelihood.py).
Dream's evaluation has no classifier-free guidance, no rolling likelihood and (here) no cached
decoding; each is refused with the reason.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..decoding.dream import dream_generate
from ..decoding.likelihood import LikelihoodSettings
from .base import DiffusionSkipLM
from .gen_kwargs import DREAM


class DreamSkipLM(DiffusionSkipLM):
    """Dream in lm-eval: Dream's Monte-Carlo likelihood and ``diffusion_generate`` (greedy
    ``entropy`` by default), static/profile/random/routed skipping. Blocks are 0-based."""

    family = "dream"
    decoding = DREAM

    extra_args = {"sampling_eps": 1e-3, "cache": None}  # cache only to refuse it with the reason

    @classmethod
    def check_family_args(cls, args: Mapping[str, Any]) -> None:
        eps = args["sampling_eps"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise ValueError(f"sampling_eps={eps!r} must be a number in (0, 1): the smallest masking probability of "
                             "Dream's likelihood")
        if args["cache"] not in (None, "none"):
            raise ValueError(
                f"cache={args['cache']!r}: cached decoding is not available for dream_skip (Dream's logits are shifted, "
                "so a window forward lacks the state left of it); use cache=none or leave it unset"
            )

    @classmethod
    def likelihood_settings(cls, args: Mapping[str, Any]) -> LikelihoodSettings:
        return LikelihoodSettings(mc_num=args["mc_num"], mc_batch=args["mc_batch"], estimator="dream",
                                  sampling_eps=float(args["sampling_eps"]))

    def likelihood_answer(self, continuation: list[int]) -> list[int]:
        """Dream's evaluation scores the continuation followed by EOS (the EOS is never masked)."""
        return continuation + [self.eot_token_id]

    def decode(self, denoise, ids: torch.Tensor, attention_mask: torch.Tensor | None, settings, row_seeds) -> torch.Tensor:
        return dream_generate(denoise, ids, attention_mask, settings, self.mask_id, row_seeds)[:, ids.shape[1] :]

    def _greedy(self, denoise, chunk, prompts, answers) -> list[bool]:
        """is_greedy of the continuation itself (Dream's evaluation computes none; the EOS its
        estimator appends is not part of what the task asks)."""
        return super()._greedy(denoise, chunk, prompts, [answer[:-1] for answer in answers])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError(
            "dream_skip: Dream's evaluation defines no rolling (perplexity) likelihood; its estimator scores an answer "
            "followed by EOS. Use loglikelihood or generate_until tasks."
        )
