"""``dlmskip calibrate``: choose a static skip set from hidden-state similarity (static paper, Alg. 1).

Run the model on calibration prompts, take the hidden states entering every block (upstream's
``output_hidden_states``: H_0 = embeddings, H_l = input of block l, H_N = ln_f(last output)), and
measure at the prompt positions the mean cosine similarity S[l] = cos(H_l, H_{l+1}): how little
block l changes the residual stream. Then pick blocks most similar first, each with S[l] >= the
threshold, never two adjacent ones (unless allowed), up to ``max_skip``.

Numbering: the paper's Algorithm 1 indexes S from 0 and returns ``l + 1``, "the later layer of each
similar pair" — H_{l+1} is the output of the paper's layer l+1, i.e. of our block l. So the paper's
output is 1-based layer numbers, and the block to skip is ``l`` in our 0-based numbering (LLaDA-8B's
{5, 7, 9} in the papers is ``skip_layers=[4,6,8]``). The profile stores both.

The diffusion model is measured at one or several denoising states: the prompt followed by an
answer region of ``answer_length`` tokens of which a fraction is masked (1.0: fully masked, as
at the first step; 0.5: half decoded, using the data's reference answer). LLaDA2 is measured with
the block-causal attention it decodes with (``--block-length``, default 32), each row's blocks
counted from its first token as when it runs alone.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..common.files import check_output_file, write_json
from ..data import add_source_arguments
from ..decoding.block_diffusion import attention_block_length
from ..models.hf_layers import hf_model_type, hidden_states, load_hf, weights_fingerprint
from ..models.hf_layers import model_identity as hf_identity
from ..models.llada import LLaDA
from ..models.loading import Checkpoint, load_model, load_tokenizer, resolve_checkpoint, tokenizer_fingerprint
from ..skipping.identity import model_identity
from ..skipping.profiles import FORMAT_VERSION, KIND, NUMBERING

CALIBRATION_PROMPTS = 64  # default --limit of calibrate and analyze, so that both measure the same prompts


def consecutive_similarity(states: list[Tensor], positions: Tensor) -> Tensor:
    """[B, len(states) - 1]: per row, mean over ``positions`` ([B, L] bool) of cos(H_l, H_{l+1})."""
    weight = positions.float()
    count = weight.sum(1).clamp(min=1)
    columns = [
        (F.cosine_similarity(a.float(), b.float(), dim=-1) * weight).sum(1) / count
        for a, b in zip(states[:-1], states[1:])
    ]
    return torch.stack(columns, 1)


def select_blocks(similarity: list[float], threshold: float, max_skip: int, allow_adjacent: bool = False) -> list[int]:
    """Algorithm 1: blocks (0-based) in the order chosen — most similar first, S >= threshold,
    no neighbour of a chosen block unless ``allow_adjacent``, at most ``max_skip``."""
    chosen: list[int] = []
    for block in sorted(range(len(similarity)), key=lambda b: -similarity[b]):  # stable: ties keep index order
        if len(chosen) >= max_skip:
            break
        if similarity[block] < threshold:
            continue
        if not allow_adjacent and (block - 1 in chosen or block + 1 in chosen):
            continue
        chosen.append(block)
    return chosen


@dataclass(frozen=True)
class Example:
    prompt: list[int]
    answer: list[int]  # reference answer tokens (may be empty: fully masked states only)


def build_states(
    examples: list[Example], fraction: float, answer_length: int, mask_id: int, pad_id: int, eos_id: int, seed: int,
    right_padded: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Left-padded ids [B, L] = prompt + answer region with ``fraction`` of it masked; attention
    mask, prompt positions and answer positions ([B, L] bool). ``right_padded``: each row starts at
    column 0 instead (block-causal attention counts blocks from column 0, so a row keeps the
    blocks it has alone)."""
    generator = torch.Generator().manual_seed(seed)
    P = max(len(e.prompt) for e in examples)
    L = P + answer_length
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    attention = torch.zeros(len(examples), L, dtype=torch.long)
    prompt_pos = torch.zeros(len(examples), L, dtype=torch.bool)
    answer_pos = torch.zeros(len(examples), L, dtype=torch.bool)
    for i, e in enumerate(examples):
        if fraction < 1 and not e.answer:
            raise ValueError("partly masked states (mask fraction < 1) need reference answers; use task or JSONL data")
        answer = (e.answer + [eos_id] * answer_length)[:answer_length]  # EOS-padded, as LLaDA's SFT data
        masked = torch.rand(answer_length, generator=generator).argsort().argsort() < round(fraction * answer_length)
        start = 0 if right_padded else P - len(e.prompt)
        end = start + len(e.prompt)  # the answer region's first column
        ids[i, start:end] = torch.tensor(e.prompt)
        ids[i, end : end + answer_length] = torch.where(masked, mask_id, torch.tensor(answer))
        attention[i, start : end + answer_length] = 1
        prompt_pos[i, start:end] = True
        answer_pos[i, end : end + answer_length] = True
    return ids, attention, prompt_pos, answer_pos


@torch.no_grad()
def similarity_profile(
    model: LLaDA, examples: list[Example], fractions: list[float], answer_length: int, pad_id: int, eos_id: int,
    positions: str = "prompt", batch_size: int = 8, seed: int = 0, block_length: int | None = None,
) -> dict[float, Tensor]:
    """Per mask fraction, S [n_examples, n_layers] for every example; with ``block_length`` the
    model attends block-causally (LLaDA2), rows right-padded so their blocks are their own."""
    device = model.device
    out: dict[float, Tensor] = {}
    for fraction in fractions:
        rows = []
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            ids, attention, prompt_pos, answer_pos = build_states(
                batch, fraction, answer_length, model.cfg.mask_token_id, pad_id, eos_id, seed + start,
                right_padded=block_length is not None,
            )
            where = {"prompt": prompt_pos, "answer": answer_pos, "all": attention.bool()}[positions]
            mask = None if bool(attention.all()) else attention.to(device)
            states = model.hidden_states(ids.to(device), mask, block_length=block_length)
            rows.append(consecutive_similarity(states, where.to(device)).cpu())
        out[fraction] = torch.cat(rows)
    return out


def load_examples(args: argparse.Namespace, tokenizer) -> tuple[list[Example], str]:
    """Calibration prompts: an lm-eval task's evaluation documents (rendered with its prompt format),
    a JSONL file of prompt/target pairs, or a text file of prompts (one per line)."""
    from ..data import encode_pairs, jsonl_texts, task_texts

    if args.task:
        texts, note = task_texts(args.task, args.include_path, split="eval")
        source = f"task {args.task}: {note}"
    elif str(args.data).endswith(".jsonl"):
        texts, source = jsonl_texts(args.data), f"data {args.data}"
    else:
        lines = [line for line in Path(args.data).read_text().splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"{args.data}: no prompts")
        texts, source = [(line, "") for line in lines], f"prompts {args.data}"
    texts = texts[: args.limit]
    if texts and not texts[0][1]:
        return [Example(tokenizer.encode(p, add_special_tokens=False), []) for p, _ in texts], source
    pairs = encode_pairs(texts, tokenizer, max_length=10**9)
    return [Example(p.prompt, p.target) for p in pairs], source


def load_model_and_examples(args: argparse.Namespace) -> tuple[Checkpoint, Any, list[Example], str]:
    """The checkpoint, its tokenizer and the prompts that ``calibrate`` and ``analyze`` take
    (arguments from ``add_model_and_prompt_arguments``)."""
    if (args.task is None) == (args.data is None):
        raise ValueError("give exactly one of --task NAME or --data FILE")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    checkpoint = load_model(args.model, args.revision, dtype=args.dtype, device=device)
    tokenizer = load_tokenizer(checkpoint.path, checkpoint.model.cfg.mask_token_id)
    examples, source = load_examples(args, tokenizer)
    return checkpoint, tokenizer, examples, source


def check_profile_output(path: str | Path, overwrite: bool) -> None:
    """Refuse, before any work, to replace a profile: runs made with its blocks would no longer match it."""
    check_output_file(path, "--output")
    if Path(path).exists() and not overwrite:
        raise ValueError(f"--output {path} exists; pass --overwrite to replace it (runs made with its blocks "
                         "then no longer match it: dlmskip sweep re-runs them) or give a new path")


def calibrate(args: argparse.Namespace) -> dict:
    """Measure, select, and write the skip profile; returns it."""
    check_profile_output(args.output, args.overwrite)
    hf_path = hf_checkpoint(args.model, args.revision)
    if hf_path:
        if args.block_length is not None:
            raise ValueError(f"--block-length {args.block_length}: an autoregressive model has no blocks; leave it out")
        measured = measure_hf(args, *load_hf_and_examples(args, hf_path))
    else:
        checkpoint, tokenizer, examples, source = load_model_and_examples(args)
        block_length = attention_block_length(checkpoint.model.cfg.family, args.block_length)
        measured = measure_llada(args, checkpoint, tokenizer, examples, source, block_length)
    profile = build_profile(args, *measured)
    write_json(Path(args.output), profile)
    return profile


def build_profile(args: argparse.Namespace, every: Tensor, by_fraction: dict[float, Tensor], base_model: dict,
                  data: dict) -> dict:
    """The skip profile of a measurement (``measure_llada``, ``measure_hf``) under the selection
    arguments (``add_selection_arguments``): the similarity per block, the blocks chosen, what was measured."""
    mean = every.mean(0).tolist()
    order = select_blocks(mean, args.threshold, args.max_skip, args.allow_adjacent)
    return {
        "format": FORMAT_VERSION,
        "kind": KIND,
        "numbering": NUMBERING,
        "skip_layers": sorted(order),
        "paper_layers": sorted(b + 1 for b in order),
        "selection_order": order,
        "threshold": args.threshold,
        "max_skip": args.max_skip,
        "allow_adjacent": args.allow_adjacent,
        "similarity": {
            "what": "mean cosine similarity between the input and the output of each block (0-based); "
                    "the last block's output is taken after the final norm, as upstream output_hidden_states",
            "mean": mean,
            "std": every.std(0, unbiased=False).tolist(),
            "by_mask_fraction": {str(f): s.mean(0).tolist() for f, s in by_fraction.items()},
        },
        "base_model": base_model,
        "data": {**data, "positions": args.positions, "seed": args.seed},
    }


def measure_llada(
    args: argparse.Namespace, checkpoint: Checkpoint, tokenizer, examples: list[Example], source: str,
    block_length: int | None = None,
) -> tuple[Tensor, dict[float, Tensor], dict, dict]:
    """S [examples x states, n_layers] of a diffusion model (block-causal with ``block_length``),
    S per mask fraction, the model's identity and what was measured."""
    model = checkpoint.model
    fractions = [float(f) for f in str(args.mask_fractions).split(",")]
    by_fraction = similarity_profile(
        model, examples, fractions, args.answer_length, tokenizer.pad_token_id, tokenizer.eos_token_id,
        args.positions, args.batch_size, args.seed, block_length,
    )
    every = torch.cat(list(by_fraction.values()))  # [examples x states, n_layers]
    data = {"source": source, "n_prompts": len(examples), "mask_fractions": fractions, "answer_length": args.answer_length}
    if block_length is not None:
        data["block_length"] = block_length  # of block-causal attention (LLaDA2)
    identity = model_identity(model.cfg, args.model, checkpoint.fingerprint, tokenizer_fingerprint(tokenizer))
    return every, by_fraction, identity, data


def hf_checkpoint(model: str, revision: str) -> Path | None:
    """The checkpoint directory when ``model`` is a causal LM of transformers (``hf_skip``'s kind)."""
    path = resolve_checkpoint(model, revision)
    return path if hf_model_type(path) else None


def load_hf_and_examples(args: argparse.Namespace, path: Path) -> tuple[Any, Any, list[Example], str]:
    """``load_model_and_examples`` for an autoregressive HF model; its settings are checked first."""
    if str(args.mask_fractions) != "1.0":
        raise ValueError("--mask-fractions applies to diffusion models; an autoregressive model is measured once, "
                         "on the prompt and reference answer")
    if (args.task is None) == (args.data is None):
        raise ValueError("give exactly one of --task NAME or --data FILE")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_hf(path, args.dtype, device)
    examples, source = load_examples(args, tokenizer)
    if args.positions == "answer" and not all(e.answer for e in examples):
        raise ValueError("--positions answer needs a reference answer for every prompt; use task or JSONL data")
    return model, tokenizer, examples, source


def measure_hf(
    args: argparse.Namespace, model, tokenizer, examples: list[Example], source: str
) -> tuple[Tensor, dict, dict, dict]:
    """As ``measure_llada`` for an autoregressive HF model: one forward over prompt + reference
    answer (there is no masked state), S averaged over ``--positions`` of those tokens."""
    fingerprint = weights_fingerprint(model)
    prefix = tokenizer("")["input_ids"]  # what the tokenizer starts a text with (BOS for Llama, Gemma)
    rows = []
    for start in range(0, len(examples), args.batch_size):
        batch = examples[start : start + args.batch_size]
        states, real = hidden_states(model, [prefix + e.prompt + e.answer for e in batch], tokenizer.pad_token_id)
        column = torch.arange(real.shape[1], device=real.device)
        prompt_len = torch.tensor([len(prefix) + len(e.prompt) for e in batch], device=real.device)[:, None]
        where = {"prompt": column < prompt_len, "answer": real & (column >= prompt_len), "all": real}[args.positions]
        rows.append(consecutive_similarity(states, where).cpu())
    data = {"source": source, "n_prompts": len(examples), "mask_fractions": None, "answer_length": None}
    return torch.cat(rows), {}, hf_identity(model.config, args.model, fingerprint), data


def add_model_and_prompt_arguments(parser: argparse.ArgumentParser, what: str, limit: int) -> None:
    """--model, --revision, --dtype, --device and the prompt source, as calibrate and analyze take them."""
    a = parser.add_argument
    a("--model", required=True, help="LLaDA hub id or checkpoint directory, or a causal LM of transformers (hf_skip)")
    a("--revision", default="main")
    a("--dtype", default="auto")
    a("--device")
    add_source_arguments(parser, f"lm-eval task whose evaluation documents are {what}",
                         "JSONL with prompt/target fields, or a text file with one prompt per line")
    a("--limit", type=int, default=limit, help=f"how many of {what} to use")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_prompt_arguments(parser, "the calibration prompts", limit=CALIBRATION_PROMPTS)
    parser.add_argument("--output", required=True, help="skip profile JSON to write (lm_eval: skip_profile=PATH); "
                                                        "an existing one is kept unless --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output profile")
    add_selection_arguments(parser)


def add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    """How the similarity is measured and the blocks chosen, as calibrate and analyze take them."""
    a = parser.add_argument
    a("--threshold", type=float, default=0.95, help="minimum similarity of a skipped block")
    a("--max-skip", type=int, default=4, help="at most this many blocks")
    a("--allow-adjacent", action="store_true", help="allow neighbouring blocks (the paper's ablation)")
    a("--mask-fractions", default="1.0", help="denoising states to measure, e.g. 1.0,0.5 (share of the answer masked)")
    a("--answer-length", type=int, default=32, help="answer region after the prompt, in tokens")
    a("--positions", default="prompt", choices=["prompt", "answer", "all"], help="where similarity is averaged (Alg. 1: prompt)")
    a("--block-length", type=int, help="LLaDA2: the block length of its block-causal attention (default 32, as it "
                                       "decodes); analyze of LLaDA: the semi-autoregressive block of the decoding traced "
                                       "(default --gen-length)")
    a("--batch-size", type=int, default=8)
    a("--seed", type=int, default=0)


def run_calibrate(args: argparse.Namespace) -> int:
    profile = calibrate(args)
    sims = profile["similarity"]["mean"]
    print("block (0-based)  paper layer (1-based)  similarity")
    for block, s in enumerate(sims):
        mark = "  <- skip" if block in profile["skip_layers"] else ""
        print(f"{block:>15}  {block + 1:>21}  {s:.4f}{mark}")
    print(f"skip_layers={profile['skip_layers']} (0-based; the papers' numbering: {profile['paper_layers']}); "
          f"written to {args.output}")
    return 0
