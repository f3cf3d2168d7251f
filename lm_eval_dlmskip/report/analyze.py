"""``dlmskip analyze``: the static paper's representation pictures for a LLaDA model.

Decodes the calibration prompts with diffusion generation and, at every denoising step, records
the hidden states entering each block (upstream ``output_hidden_states``). From them:

* ``similarity_profile.png`` — cosine similarity between each block's input and output, mean and
  spread across prompts and denoising steps (the signal Algorithm 1 skips on);
* ``similarity_heatmap.png`` — the same per denoising step (rows) and block (columns);
* ``tokenwise_similarity.png`` — cosine similarity of neighbouring tokens inside each layer's
  hidden state, at the first and the last denoising step (recency bias shows as low values);
* ``hidden_norms.png`` — L2 norm of the hidden states by depth (mean over tokens, and the largest
  token, which exposes sink tokens).

The numbers behind the pictures go to ``analysis.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..generation import GenerationSettings, generate
from ..loading import load_llada, load_tokenizer
from ..model import LLaDA
from .calibrate import consecutive_similarity, load_examples, write_json_atomic


@torch.no_grad()
def record_trajectory(model: LLaDA, prompts: list[list[int]], settings: GenerationSettings, pad_id: int) -> dict:
    """Decode the prompts (one left-padded batch) and measure the hidden states at every step."""
    device = model.device
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts], device=device)
    real = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=device)
    attention = None if bool(real.all()) else real
    window = min(len(p) for p in prompts) + settings.gen_length  # right-aligned columns every row has
    steps: list[dict[str, Tensor]] = []

    def denoise(x: Tensor, mask: Tensor | None, logits_at):
        states: list[Tensor] = []
        h, _ = model.trunk(x, mask, hidden_states=states)
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

    generate(denoise, ids, attention, settings, model.cfg.mask_token_id)
    return {
        "similarity": torch.stack([s["similarity"] for s in steps]),  # [steps, B, n_layers]
        "tokenwise_first": steps[0]["tokenwise"],  # [layers + 1, window - 1]
        "tokenwise_last": steps[-1]["tokenwise"],
        "norm_mean": torch.stack([s["norm_mean"] for s in steps]).mean(0),  # [layers + 1]
        "norm_max": torch.stack([s["norm_max"] for s in steps]).amax(0),
    }


def plot_analysis(trace: dict, out: Path, title: str) -> list[Path]:
    """The four PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    trace = {k: v.numpy() for k, v in trace.items()}
    sims = trace["similarity"]  # [steps, B, n_layers]
    n_layers = sims.shape[-1]
    blocks = list(range(n_layers))
    flat = sims.reshape(-1, n_layers)
    mean, std = flat.mean(0), flat.std(0)
    files = []

    fig, ax = plt.subplots(figsize=(8, 4), layout="constrained")
    ax.plot(blocks, mean, marker="o", label="mean")
    ax.fill_between(blocks, mean - std, mean + std, alpha=0.25, label="± 1 std (prompts × steps)")
    ax.axhline(0.95, color="grey", linestyle="--", linewidth=1, label="threshold 0.95")
    ax.set(title=f"Block input/output cosine similarity — {title}", xlabel="block (0-based; paper layer = block + 1)",
           ylabel="cosine similarity (1 = block changes nothing)")
    ax.legend()
    files.append(_save(fig, out / "similarity_profile.png"))

    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    image = ax.imshow(sims.mean(1), aspect="auto", cmap="viridis", origin="upper")
    ax.set(title=f"Block input/output similarity over denoising — {title}", xlabel="block (0-based)",
           ylabel="denoising step (0 = all masked)")
    fig.colorbar(image, ax=ax, label="cosine similarity")
    files.append(_save(fig, out / "similarity_heatmap.png"))

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True, layout="constrained")
    for ax, key, name in zip(axes, ("tokenwise_first", "tokenwise_last"), ("first step (all masked)", "last step")):
        image = ax.imshow(trace[key], aspect="auto", cmap="magma", vmin=-1, vmax=1, origin="upper")
        ax.set(title=f"Neighbouring-token similarity, {name}", xlabel="token pair (i, i+1), last columns of the sequence")
    axes[0].set_ylabel("hidden state (0 = embeddings, l = input of block l, last = final norm)")
    fig.colorbar(image, ax=axes, label="cosine similarity")
    fig.suptitle(title)
    files.append(_save(fig, out / "tokenwise_similarity.png"))

    fig, ax = plt.subplots(figsize=(8, 4), layout="constrained")
    depth = list(range(len(trace["norm_mean"])))
    ax.semilogy(depth, trace["norm_mean"], marker="o", label="mean over tokens")
    ax.semilogy(depth, trace["norm_max"], marker="^", label="largest token (sink tokens)")
    ax.set(title=f"Hidden-state norm by depth — {title}", xlabel="hidden state (0 = embeddings, l = input of block l)",
           ylabel="L2 norm (log scale)")
    ax.legend()
    files.append(_save(fig, out / "hidden_norms.png"))
    return files


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model", required=True, help="LLaDA hub id or checkpoint directory")
    a("--out", required=True, help="directory for the PNG files and analysis.json")
    a("--task", help="lm-eval task whose evaluation documents are the prompts")
    a("--include-path", help="extra lm-eval task folder")
    a("--data", help="JSONL with prompt/target fields, or a text file with one prompt per line")
    a("--limit", type=int, default=16, help="prompts to decode")
    a("--gen-length", type=int, default=32, help="answer tokens to decode")
    a("--steps", type=int, help="denoising steps (default: gen-length)")
    a("--block-length", type=int, help="semi-autoregressive block length (default: gen-length)")
    a("--revision", default="main")
    a("--dtype", default="auto")
    a("--device")


def run_analyze(args: argparse.Namespace) -> int:
    if (args.task is None) == (args.data is None):
        raise ValueError("give exactly one of --task NAME or --data FILE")
    checkpoint = load_llada(args.model, args.revision, dtype=args.dtype, device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(checkpoint.path, checkpoint.model.cfg.mask_token_id)
    examples, source = load_examples(args, tokenizer)
    settings = GenerationSettings(args.gen_length, args.steps or args.gen_length, args.block_length or args.gen_length)
    trace = record_trajectory(checkpoint.model, [e.prompt for e in examples], settings, tokenizer.pad_token_id)
    out = Path(args.out)
    files = plot_analysis(trace, out, Path(args.model).name or args.model)
    write_json_atomic(out / "analysis.json", {
        "model": args.model, "source": source, "n_prompts": len(examples), "generation": vars(settings),
        "numbering": "similarity[step][prompt][block] with 0-based blocks; hidden states 0 = embeddings, l = input of block l",
        **{k: v.tolist() for k, v in trace.items()},
    })
    for f in files:
        print(f)
    return 0
