"""``dlmskip analyze``: the static paper's representation pictures for a LLaDA model.

Decodes the calibration prompts with the family's own diffusion decoding (LLaDA's semi-autoregressive
``generate``, Dream's ``diffusion_generate``, LLaDA2's block diffusion with its block-causal
attention) and, at every denoising step, records the hidden states entering each block (upstream
``output_hidden_states``) over the columns that forward computes. From them:

* ``similarity_profile.png`` — cosine similarity between each block's input and output, measured
  exactly as ``dlmskip calibrate`` measures it (same prompts, mask fractions, positions, seed), with
  the threshold and the blocks calibrate's Algorithm 1 selects from it marked;
* ``similarity_heatmap.png`` — the same similarity along the decoding of the first prompts, per
  denoising step (rows) and block (columns);
* ``tokenwise_similarity.png`` — cosine similarity of neighbouring tokens inside each layer's
  hidden state, at the first and the last denoising step (recency bias shows as low values);
* ``hidden_norms.png`` — L2 norm of the hidden states by depth (mean over tokens, and the largest
  token, which exposes sink tokens).

Blocks are numbered from 0, as in ``model_args``; the block axes carry the papers' 1-based layer
numbers on a second axis. The numbers behind the pictures go to ``analysis.json`` (the calibration
under ``"calibration"``, in the layout of calibrate's skip profile). An autoregressive HF model
(``hf_skip``'s kind) has no denoising steps: its pictures are those of one forward over the prompts.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..common.files import check_output_dir, write_json
from ..decoding.block_diffusion import BlockDiffusionSettings, attention_block_length, block_generate
from ..decoding.dream import DreamGenerationSettings, dream_generate
from ..decoding.generate import GenerationSettings, generate
from ..models.hf_layers import hidden_states
from ..models.llada import LLaDA
from ..models.loading import read_config, resolve_checkpoint
from .calibrate import (
    CALIBRATION_PROMPTS,
    add_model_and_prompt_arguments,
    add_selection_arguments,
    build_profile,
    consecutive_similarity,
    hf_checkpoint,
    load_hf_and_examples,
    load_model_and_examples,
    measure_hf,
    measure_llada,
)


@torch.no_grad()
def record_trajectory(model: LLaDA, prompts: list[list[int]], settings: Any, pad_id: int, eos_id: int) -> dict:
    """Decode the prompts (one left-padded batch) with the family's own decoding (LLaDA's semi-
    autoregressive ``generate``, Dream's ``diffusion_generate``, LLaDA2's ``block_generate``
    without cache, so that every step computes the prefix up to its block) and measure the hidden
    states at every step."""
    device = model.device
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts], device=device)
    real = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=device)
    attention = None if bool(real.all()) else real
    window = min(len(p) for p in prompts) + settings.gen_length  # right-aligned columns every row has
    steps: list[dict[str, Tensor]] = []

    def denoise(x: Tensor, mask: Tensor | None, logits_at, block_length: int | None = None):
        states: list[Tensor] = []
        h, _ = model.trunk(x, mask, hidden_states=states, block_length=block_length)
        states.append(model.ln_f(h))
        positions = torch.ones(x.shape, dtype=torch.bool, device=device) if mask is None else mask.bool()
        tail = [s[:, -window:].float() for s in states]
        norms = torch.stack([s.norm(dim=-1) for s in states], 1)  # [B, layers + 1, L]
        steps.append({
            "similarity": consecutive_similarity(states, positions).cpu(),  # [B, n_layers]
            "tokenwise": torch.stack([F.cosine_similarity(s[:, :-1], s[:, 1:], dim=-1) for s in tail], 1).mean(0).cpu(),
            "norm_mean": ((norms * positions[:, None]).sum(-1) / positions.sum(-1)[:, None]).mean(0).cpu(),
            "norm_max": (norms * positions[:, None]).amax(-1).amax(0).cpu(),
        })
        return model.head(h, logits_at)

    if model.cfg.family == "llada2":
        block_generate(denoise, prompts, settings, model.cfg.mask_token_id, eos_id, pad_id, device)
    else:
        decode = dream_generate if model.cfg.family == "dream" else generate
        decode(denoise, ids, attention, settings, model.cfg.mask_token_id)
    return {
        "similarity": torch.stack([s["similarity"] for s in steps]),  # [steps, B, n_layers]
        "tokenwise_first": steps[0]["tokenwise"],  # [layers + 1, window - 1]
        "tokenwise_last": steps[-1]["tokenwise"],
        "norm_mean": torch.stack([s["norm_mean"] for s in steps]).mean(0),  # [layers + 1]
        "norm_max": torch.stack([s["norm_max"] for s in steps]).amax(0),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_prompt_arguments(parser, "the prompts", limit=CALIBRATION_PROMPTS)
    a = parser.add_argument
    a("--out", required=True, help="directory for the PNG files and analysis.json")
    add_selection_arguments(parser)
    a("--decode-limit", type=int, default=16, help="how many of the prompts (the first) to decode for the per-step pictures")
    a("--gen-length", type=int, default=32, help="answer tokens to decode")
    a("--steps", type=int, help="denoising steps (default: gen-length; LLaDA2: per block, default the block length)")


def decoding_settings(args: argparse.Namespace, family: str) -> Any:
    """The decoding analyze traces: the family's own, greedy, with --gen-length and --steps (LLaDA2:
    block diffusion in blocks of --block-length with its default threshold, uncached)."""
    if family == "llada2":
        block_length = attention_block_length(family, args.block_length)
        settings = BlockDiffusionSettings(args.gen_length, block_length, args.steps or block_length, cache="none")
        settings.check()
        return settings
    steps = args.steps or args.gen_length
    if family == "dream":
        if args.block_length is not None:
            raise ValueError("--block-length: Dream decodes the whole answer at once (diffusion_generate has no blocks)")
        return DreamGenerationSettings(args.gen_length, steps)
    return GenerationSettings(args.gen_length, steps, args.block_length or args.gen_length)


def run_analyze(args: argparse.Namespace) -> int:
    check_output_dir(args.out, "--out")
    if args.decode_limit < 1:
        raise ValueError(f"--decode-limit {args.decode_limit}: give 1 or more prompts to decode")
    hf_path = hf_checkpoint(args.model, args.revision)
    if hf_path is not None:
        return analyze_hf(args, hf_path)
    family = read_config(resolve_checkpoint(args.model, args.revision)).family
    settings = decoding_settings(args, family)
    checkpoint, tokenizer, examples, source = load_model_and_examples(args)
    block_length = settings.block_length if family == "llada2" else None  # of block-causal attention
    calibration = build_profile(args, *measure_llada(args, checkpoint, tokenizer, examples, source, block_length))
    decoded = examples[: args.decode_limit]
    trace = record_trajectory(checkpoint.model, [e.prompt for e in decoded], settings, tokenizer.pad_token_id,
                              tokenizer.eos_token_id)
    out = Path(args.out)
    from .plots import plot_analysis

    files = plot_analysis(trace, calibration, out, Path(args.model).name or args.model)
    write_json(out / "analysis.json", {
        "model": args.model, "source": source, "n_prompts": len(examples), "n_decoded": len(decoded),
        "generation": vars(settings),
        "numbering": "similarity[step][prompt][block] with 0-based blocks; hidden states 0 = embeddings, l = input of block l",
        **{k: v.tolist() for k, v in trace.items()},
        "calibration": calibration,
    })
    for f in files:
        print(f)
    print(f"skip_layers={calibration['skip_layers']} (0-based; the papers' numbering: {calibration['paper_layers']}): "
          f"what dlmskip calibrate selects with these prompts and settings")
    return 0


@torch.no_grad()
def record_prompt_states(model, prompts: list[list[int]], pad_id: int) -> dict:
    """``record_trajectory``'s measures for an autoregressive model: one forward over the prompts
    (right-padded), the only "step" it has."""
    states, real = hidden_states(model, prompts, pad_id)
    window = min(len(p) for p in prompts)  # left-aligned columns every row has
    head = [s[:, :window].float() for s in states]
    norms = torch.stack([s.float().norm(dim=-1) for s in states], 1)  # [B, layers + 1, L]
    tokenwise = torch.stack([F.cosine_similarity(s[:, :-1], s[:, 1:], dim=-1) for s in head], 1).mean(0).cpu()
    return {
        "similarity": consecutive_similarity(states, real).cpu()[None],  # [1, B, n_layers]
        "tokenwise_first": tokenwise,  # [layers + 1, window - 1]
        "norm_mean": ((norms * real[:, None]).sum(-1) / real.sum(-1)[:, None]).mean(0).cpu(),
        "norm_max": (norms * real[:, None]).amax(-1).amax(0).cpu(),
    }


def analyze_hf(args: argparse.Namespace, path: Path) -> int:
    """``dlmskip analyze`` of an autoregressive HF model: the pictures of one forward over the prompts;
    the denoising views (similarity per step, first and last step) do not exist for it."""
    print("an autoregressive model has no denoising steps: similarity_heatmap.png is not drawn, the tokenwise "
          "picture shows the prompt forward, and --gen-length/--steps/--block-length are not used")
    model, tokenizer, examples, source = load_hf_and_examples(args, path)
    calibration = build_profile(args, *measure_hf(args, model, tokenizer, examples, source))
    prefix = tokenizer("")["input_ids"]  # BOS where the tokenizer adds one
    trace = record_prompt_states(model, [prefix + e.prompt for e in examples], tokenizer.pad_token_id)
    out = Path(args.out)
    from .plots import plot_analysis

    files = plot_analysis(trace, calibration, out, Path(args.model).name or args.model, denoising=False)
    write_json(out / "analysis.json", {
        "model": args.model, "source": source, "n_prompts": len(examples), "generation": None,
        "numbering": "similarity[0][prompt][layer] with 0-based layers (one forward over the prompts); "
                     "hidden states 0 = embeddings, l = input of layer l",
        **{k: v.tolist() for k, v in trace.items()},
        "calibration": calibration,
    })
    for f in files:
        print(f)
    print(f"skip_layers={calibration['skip_layers']} (0-based): what dlmskip calibrate selects with these prompts and settings")
    return 0
