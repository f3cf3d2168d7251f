"""``lm_eval --model llada2_skip``: the LLaDA2 family (LLaDA2.0/2.1 mini and flash, mixtures of
experts) decoded by block diffusion as their own ``generate`` does, with an exact KV cache over
finished blocks, and scored by a block-wise Monte-Carlo likelihood; every skip method on top.

Likelihood: LLaDA2 attends block-causally, so log p(answer | prompt) factorises exactly over the
answer's blocks (a block sees the blocks before it): the sum over blocks b of log p(answer_b |
prompt, answer_<b). Each term is estimated as LLaDA estimates a whole answer (a stratified number
l of block b's answer tokens masked, the prefix clean, score sum(CE) * T_b / l: a lower bound),
and the terms are summed. A block holding one answer token is exact with one sample. This is the
bound block diffusion models are trained on (BD3-LM's NELBO, blocks conditioned on clean prefixes).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Mapping

import torch

from ..decoding.block_diffusion import BlockDiffusionSettings, attention_block_length, block_generate
from ..decoding.likelihood import LikelihoodSettings
from .base import DiffusionSkipLM, log
from .gen_kwargs import LLADA2
from .requests import sum_pieces


class LLaDA2SkipLM(DiffusionSkipLM):
    """LLaDA2 in lm-eval: block diffusion (threshold and quota rule, EOS after a block), block-wise
    Monte-Carlo likelihood, static/profile/random/routed skipping. Blocks are 0-based."""

    family = "llada2"
    decoding = LLADA2
    graphs = False  # block-causal windows grow block by block; forwards run eagerly

    @classmethod
    def likelihood_settings(cls, args: Mapping[str, Any]) -> LikelihoodSettings:
        return LikelihoodSettings(mc_num=args["mc_num"], mc_batch=args["mc_batch"])

    @property
    def block_length(self) -> int:
        """The block length attention is block-causal in: model_args' ``block_length``, else LLaDA2's 32."""
        return attention_block_length(self.family, self.gen_args.get("block_length"), "block_length")

    @property
    def likelihood_forward(self):
        return partial(self.model, block_length=self.block_length)

    def decode(self, denoise, ids: torch.Tensor, attention_mask: torch.Tensor | None, settings, row_seeds) -> torch.Tensor:
        prompts = ids.tolist() if attention_mask is None else [
            row[mask.bool()].tolist() for row, mask in zip(ids, attention_mask)]  # sync: once per batch
        return block_generate(denoise, prompts, settings, self.mask_id, self.eot_token_id, self.tokenizer.pad_token_id,
                              self._device, row_seeds)

    def plain_decoding_flops(self, prompt_lens: torch.Tensor, settings: BlockDiffusionSettings) -> torch.Tensor:
        """Upstream's uncached decoding: from the prompt's last block on, every block takes all its
        steps, each a forward over the prefix up to the block's end with the head over the block."""
        bl, flops = settings.block_length, self.meter.flops
        first = torch.div(prompt_lens, bl, rounding_mode="floor")
        blocks = torch.ceil((prompt_lens + settings.gen_length) / bl)
        total = torch.zeros_like(prompt_lens)
        for b in range(int(first.min()), int(blocks.max())):  # sync: the block range, once per batch
            n = torch.full_like(prompt_lens, (b + 1) * bl)
            one = 4 * flops.d_model * n + 2 * flops.d_model * flops.vocab * bl + flops.layers(n).sum(1)
            total += torch.where((b >= first) & (b < blocks), settings.steps_per_block * one, 0)
        return total

    def _loglikelihood_tokens(self, requests, tasks=None, greedy=None, owners=None, disable_tqdm: bool = False, **kwargs):
        """Each (context, continuation) split at the block boundaries of its answer, each piece scored
        given the clean tokens before it, the pieces' scores summed (the module's docstring);
        is_greedy holds when every piece is greedy. A context that does not fit is cut by whole
        blocks from the left, so the blocks stay where they were."""
        tasks = tasks or [None] * len(requests)
        greedy = greedy or [False] * len(requests)
        owners = owners or list(range(len(requests)))
        pieces, piece_of, piece_args = [], [], ([], [], [])
        for i, (strings, ctx, cont) in enumerate(requests):
            ctx = self._aligned_context(ctx, cont)
            for start, stop in answer_blocks(len(ctx), len(cont), self.block_length):
                pieces.append((strings, ctx + cont[:start], cont[start:stop]))
                piece_of.append(i)
                for column, value in zip(piece_args, (tasks[i], greedy[i], owners[i])):
                    column.append(value)
        with self.pieces_only():
            scored = super()._loglikelihood_tokens(pieces, *piece_args, disable_tqdm=disable_tqdm) if pieces else []
        results = sum_pieces(piece_of, scored, len(requests))
        for (strings, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", strings, result)
        return results

    def _aligned_context(self, ctx: list[int], cont: list[int]) -> list[int]:
        """``ctx`` cut from the left by whole blocks until context + continuation fit ``max_length``;
        refused when even that cannot fit (the answer would move inside its blocks)."""
        excess = len(ctx) + len(cont) - self.max_length
        if excess <= 0:
            return ctx
        drop = -(-excess // self.block_length) * self.block_length
        if drop > len(ctx):
            raise ValueError(
                f"loglikelihood: a continuation of {len(cont)} tokens after a context of {len(ctx)} does not fit "
                f"max_length={self.max_length} with the context cut by whole blocks of block_length="
                f"{self.block_length} (the answer must keep its place in its blocks); raise max_length"
            )
        log.warning("context of %d tokens left-truncated by %d (whole blocks) to fit max_length=%d", len(ctx), drop,
                    self.max_length)
        return ctx[drop:]


def answer_blocks(prompt_len: int, answer_len: int, block_length: int) -> list[tuple[int, int]]:
    """(start, stop) of each piece of an answer that starts at column ``prompt_len``, cut at the
    block boundaries (blocks counted from column 0)."""
    cuts = list(range(block_length - prompt_len % block_length, answer_len, block_length))
    bounds = [0, *[c for c in cuts if c > 0], answer_len]
    return list(zip(bounds[:-1], bounds[1:]))
