"""``lm_eval --model dream_skip``: Dream-7B scored and decoded as its own evaluation does, with
blocks skipped.

Everything but what differs is ``LLaDASkipLM``'s: batching, tokenizer, skip policies, routers,
FLOPs, ranks. What differs: the checkpoint family (a LLaDA checkpoint is refused before its
weights load), decoding (``diffusion_generate``: generation_dream.py), the likelihood's forward
process and its answer, which ends with an EOS as in Dream's ``_encode_pair`` (likelihood.py).
Dream's evaluation has no classifier-free guidance, no rolling likelihood and (here) no cached
decoding; each is refused with the reason.
"""

from __future__ import annotations

from typing import Any

import torch

from .gen_kwargs import DREAM
from .generation_dream import dream_generate
from .harness import LLaDASkipLM
from .likelihood import LikelihoodSettings


class DreamSkipLM(LLaDASkipLM):
    """Dream in lm-eval: Dream's Monte-Carlo likelihood and ``diffusion_generate`` (greedy
    ``entropy`` by default), static/profile/random/routed skipping. Blocks are 0-based."""

    family = "dream"
    decoding = DREAM

    def __init__(
        self,
        pretrained: str,
        revision: str = "main",
        tokenizer: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = 64,
        max_length: int | None = None,
        mc_num: int = 128,
        mc_batch: int = 16,
        sampling_eps: float = 1e-3,
        check_greedy: bool = False,
        gen_length: int | None = None,
        steps: int | None = None,
        alg: str | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        alg_temp: float | None = None,
        eps: float | None = None,
        cache: str | None = None,
        skip_layers: list[int] | int | str | None = None,
        skip_random: int | None = None,
        skip_profile: str | None = None,
        skip_k: int | None = None,
        router: str | None = None,
        router_tau: float | None = None,
        allow_mismatch: bool = False,
        seed: int = 1234,
        mc_seed: int = 1234,
        compile: bool = False,
        cuda_graphs: bool = True,
        peft: str | None = None,
        trust_remote_code: bool | None = None,
    ) -> None:
        if cache not in (None, "none"):
            raise ValueError(
                f"cache={cache!r}: cached decoding is not available for dream_skip (Dream's logits are shifted, so a "
                "window forward lacks the state left of it); use cache=none or leave it unset"
            )
        self._dream_args = {"gen_length": gen_length, "steps": steps, "alg": alg, "temperature": temperature,
                            "top_p": top_p, "top_k": top_k, "alg_temp": alg_temp, "eps": eps}
        self._sampling_eps = float(sampling_eps)
        super().__init__(
            pretrained, revision=revision, tokenizer=tokenizer, dtype=dtype, device=device, batch_size=batch_size,
            max_batch_size=max_batch_size, max_length=max_length, mc_num=mc_num, mc_batch=mc_batch,
            check_greedy=check_greedy, skip_layers=skip_layers, skip_random=skip_random, skip_profile=skip_profile,
            skip_k=skip_k, router=router, router_tau=router_tau, allow_mismatch=allow_mismatch, seed=seed,
            mc_seed=mc_seed, compile=compile, cuda_graphs=cuda_graphs, peft=peft, trust_remote_code=trust_remote_code,
        )

    def decoding_args(self, given: dict[str, Any]) -> dict[str, Any]:
        return self._dream_args

    def likelihood_settings(self, mc_num: int, mc_batch: int, cfg: float) -> LikelihoodSettings:
        return LikelihoodSettings(mc_num=mc_num, mc_batch=mc_batch, estimator="dream", sampling_eps=self._sampling_eps)

    def likelihood_answer(self, continuation: list[int]) -> list[int]:
        """Dream's evaluation scores the continuation followed by EOS (the EOS is never masked)."""
        return continuation + [self.eot_token_id]

    def decode(self, denoise, ids: torch.Tensor, attention_mask: torch.Tensor | None, settings, row_seeds) -> torch.Tensor:
        return dream_generate(denoise, ids, attention_mask, settings, self.mask_id, row_seeds)

    def _greedy(self, denoise, chunk, prompts, answers) -> list[bool]:
        """is_greedy of the continuation itself (Dream's evaluation computes none; the EOS its
        estimator appends is not part of what the task asks)."""
        return super()._greedy(denoise, chunk, prompts, [answer[:-1] for answer in answers])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError(
            "dream_skip: Dream's evaluation defines no rolling (perplexity) likelihood; its estimator scores an answer "
            "followed by EOS. Use loglikelihood or generate_until tasks."
        )
