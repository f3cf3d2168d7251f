"""``dlmskip train`` / ``python -m lm_eval_dlmskip.train``: learn the routers of a frozen LLaDA.

The router paper's objective (Sec. 3.3, App. A.2): the prompt is never masked; each example's
target is masked with its own ratio p_mask ~ U(eps, 1); every block's router votes by
Gumbel-softmax over the masked tokens and the row's gate is hard at tau (straight-through);
alpha = mean skip gate over blocks, and

    loss = (CE_masked + lambda * |alpha - alpha_target|) / p_mask      (CE / p_mask + lambda |..|
                                                                        with --no-mask-scaling)

with CE_masked the summed cross-entropy of the masked target tokens over the target length (LLaDA's
SFT normalisation). Only router parameters (and LoRA adapters with --lora) learn. AdamW (0.9, 0.95),
weight decay 0.02, grad-norm clip 1.0, peak lr 5e-5, linear warmup then half-cosine, bf16 autocast,
gradient accumulation to the effective batch size; data parallel under ``accelerate launch``.

Every random draw of a step comes from a generator seeded by (seed, step, micro-batch of the step),
and the data order by (seed, epoch), so a resumed run (which keeps its micro-batch size) repeats an
uninterrupted one exactly, and N processes see the same micro-batches as one at the same size.
Without --batch-size the micro-batch is the largest that fits on the GPU (4 on a CPU).
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from ..common.files import write_atomically
from ..data import Pair, encode_pairs, jsonl_texts, split_validation, task_texts, tokenizer_chat_template
from ..decoding.block_diffusion import attention_block_length
from ..models.loading import load_model, load_tokenizer, read_config, resolve_checkpoint, tokenizer_fingerprint
from ..skipping.identity import check_identity, model_identity
from ..skipping.profiles import read_profile
from ..skipping.router_checkpoints import save_routers
from ..skipping.routers import RouterConfig, Routers
from .budget import CALIBRATION_DRAWS, DualAscent, calibrated, initial_skips, start_skipping
from .config import TrainConfig, check_blocks
from .objective import VALIDATION_DRAWS, Batch, RouterObjective, collate, validate
from .state import check_run_folder, load_train_state, resumed_log, save_train_state

log = logging.getLogger("lm_eval_dlmskip.train")


@lru_cache(maxsize=4)
def epoch_order(n: int, epoch: int, seed: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)


def step_examples(pairs: list[Pair], step: int, per_step: int, seed: int) -> list[Pair]:
    """The examples of optimizer step ``step``: the next slice of the epoch permutations."""
    n, chosen = len(pairs), []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, index = divmod(k, n)
        chosen.append(pairs[epoch_order(n, epoch, seed)[index]])
    return chosen


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to the peak, then half a cosine down to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def trainable(objective: RouterObjective) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in objective.named_parameters() if p.requires_grad]


CPU_MICRO_BATCH = 4  # without --batch-size on a CPU, where probing memory means nothing


def choose_micro_batch(fits: Callable[[int], None], per_process: int, cuda: bool) -> int:
    """The largest micro-batch that divides this process's examples per step and, on a GPU, for
    which ``fits(size)`` runs out of no memory (accelerate's find_executable_batch_size, stepping
    down through the divisors, as evaluation's batch_size=auto probes); at most 4 on a CPU."""
    from accelerate.utils import find_executable_batch_size

    sizes = [size for size in range(per_process, 0, -1) if per_process % size == 0]
    if not cuda:
        return next(size for size in sizes if size <= CPU_MICRO_BATCH)
    smaller = iter(sizes[1:] + [0])

    @find_executable_batch_size(starting_batch_size=sizes[0], reduce_batch_size_fn=lambda: next(smaller))
    def probe(size: int) -> int:
        fits(size)
        return size

    try:
        return probe()
    except RuntimeError as err:
        if "reached zero" not in str(err):
            raise
        raise ValueError("--batch-size not given and not even 1 example of the longest fits in GPU memory; lower --max-length") from err


def worst_case_probe(objective: RouterObjective, longest: Pair, pad_id: int, accelerator) -> Callable[[int], None]:
    """``fits(size)`` for choose_micro_batch: forward and backward of ``size`` copies of the longest
    example with all of its target masked (the most LM-head rows), gradients dropped after."""
    worst = RouterObjective(objective.backbone, objective.routers, replace(objective.cfg, min_mask_ratio=1.0),
                            objective.mask_id, objective.block_length)

    def fits(size: int) -> None:
        batch = collate([longest] * size, pad_id).to(accelerator.device)
        with accelerator.autocast():
            loss, _ = worst(batch, torch.Generator(accelerator.device).manual_seed(0))
        loss.backward()
        objective.zero_grad(set_to_none=True)

    return fits


STATS = ("loss", "ce", "skip_loss", "alpha", "decided_execution")


def train_step(objective: nn.Module, accelerator, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
               batches: list[Batch], seeds: list[int], grad_clip: float) -> Tensor:
    """One optimizer step over this process's micro-batches; returns the step's mean STATS on the
    device, read back only at logging steps."""
    stats = torch.zeros(len(STATS), device=accelerator.device)
    for micro, (batch, seed) in enumerate(zip(batches, seeds)):
        generator = torch.Generator(accelerator.device).manual_seed(seed)
        last = micro == len(batches) - 1
        with (nullcontext() if last else accelerator.no_sync(objective)), accelerator.autocast():
            loss, parts = objective(batch, generator)
            accelerator.backward(loss / len(batches))  # gradients all-reduced on the last micro-batch
        stats += torch.stack([loss.detach(), *(parts[k] for k in STATS[1:])]).float() / len(batches)
    accelerator.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stats


def load_pairs(cfg: TrainConfig, tokenizer) -> tuple[list[Pair], str]:
    if cfg.task is not None:
        chat = tokenizer_chat_template(tokenizer) if cfg.apply_chat_template else None
        texts, source = task_texts(cfg.task, cfg.include_path, "train", cfg.num_fewshot, chat, cfg.fewshot_as_multiturn, cfg.seed)
        source = f"task {cfg.task}: {source}"
    else:
        texts, source = jsonl_texts(cfg.data), f"data {cfg.data}"
    return encode_pairs(texts, tokenizer, cfg.max_length), source


def auto_micro_batch(objective: RouterObjective, pairs: list[Pair], per_process: int, pad_id: int, accelerator) -> int:
    """Without --batch-size: the largest micro-batch that fits on every process (the smallest of
    their choices, so all accumulate alike); the random draws depend on it, so it is recorded."""
    longest = max(pairs, key=lambda p: len(p.prompt) + len(p.target))
    fits = worst_case_probe(objective, longest, pad_id, accelerator)
    size = choose_micro_batch(fits, per_process, accelerator.device.type == "cuda")
    if accelerator.num_processes > 1:
        size = int(accelerator.gather(torch.tensor([size], device=accelerator.device)).min())
    log.info("--batch-size not given: %d examples per micro-batch and process", size)
    return size


def train(cfg: TrainConfig) -> dict:
    """Train routers and write the checkpoint directory ``cfg.output``; returns the final metrics."""
    from accelerate import Accelerator
    from tqdm import tqdm

    cfg.check()
    out = Path(cfg.output)
    saved = check_run_folder(out, cfg.resume)
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda and cfg.dtype == "bfloat16" else "no")
    world = accelerator.num_processes
    per_step = cfg.effective_batch_size
    if per_step % (world * (cfg.batch_size or 1)):
        raise ValueError(f"--effective-batch-size {per_step} is not a multiple of --batch-size x processes ({cfg.batch_size or 1} x {world})")
    device = accelerator.device

    check_blocks(cfg, read_config(resolve_checkpoint(cfg.model, cfg.revision)).n_layers)  # config.json only
    checkpoint = load_model(cfg.model, cfg.revision, dtype=cfg.dtype if cuda else "float32", device=device)
    backbone = checkpoint.model.requires_grad_(False)
    mcfg = backbone.cfg
    block_length = attention_block_length(mcfg.family, cfg.block_length)  # LLaDA2: block-causal, as decoding
    tokenizer = load_tokenizer(checkpoint.path, mcfg.mask_token_id)
    pad_id = tokenizer.pad_token_id
    pairs, source = load_pairs(cfg, tokenizer)
    train_pairs, val_pairs = split_validation(pairs, cfg.val_fraction, cfg.seed)
    if not train_pairs:
        raise ValueError(f"no training examples from {source}")
    steps_per_epoch = math.ceil(len(train_pairs) / per_step)
    total = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * steps_per_epoch)
    warmup = max(1, min(warmup, total))

    torch.manual_seed(cfg.seed)  # router initialisation
    routers = Routers(RouterConfig(mcfg.d_model, mcfg.n_layers, cfg.router_hidden, cfg.router_depth, cfg.norm_first, cfg.init_bias,
                                   cfg.tau, keep=cfg.keep_blocks, mask_ratio=cfg.router_mask_ratio)).to(device)
    init_blocks = None
    if cfg.init_profile is not None:
        profile = read_profile(cfg.init_profile)
        check_identity(profile["base_model"], mcfg, checkpoint.fingerprint, False,
                       f"--init-profile {cfg.init_profile} was measured on", tokenizer_fingerprint(tokenizer))
        init_blocks = initial_skips(profile["selection_order"], mcfg.n_layers, cfg.target_ratio, cfg.init_k)
        start_skipping(routers, init_blocks)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"]
        backbone = get_peft_model(backbone, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=[f"blocks.{i}.{t}" for i in range(mcfg.n_layers) for t in targets]))
    objective = RouterObjective(backbone, routers, cfg, mcfg.mask_token_id, block_length)
    params = [p for _, p in trainable(objective)]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    start, micro, metrics, offset = 0, cfg.batch_size, {}, 0.0
    if saved:
        state = load_file(str(out / "router.safetensors"), device=str(device))
        routers.load_state_dict(state)
        if cfg.lora:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(backbone, load_file(str(out / "adapter" / "adapter_model.safetensors"), device=str(device)))
        start, micro, offset = load_train_state(out, optimizer, cfg)
        metrics = json.loads((out / "router.json").read_text())["metrics"]  # kept until the next validation
        log.info("resuming %s at step %d of %d", out, start, total)
    elif cfg.resume:
        log.info("resuming %s from step 0: it stopped before its first checkpoint", out)
    micro = micro or auto_micro_batch(objective, train_pairs, per_step // world, pad_id, accelerator)
    accumulation = per_step // (micro * world)
    objective = accelerator.prepare(objective)  # DDP syncs only parameters that require grad
    budget = None if cfg.target_ratio is None else DualAscent(cfg.target_ratio, cfg.dual_lr, device, offset)
    budget_result: dict = {}  # the final calibration's, recorded with the last save

    identity = model_identity(mcfg, cfg.model, checkpoint.fingerprint, tokenizer_fingerprint(tokenizer))
    settings = {
        "lambda": cfg.lam,
        "alpha_target": cfg.alpha_target,
        "target_ratio": cfg.target_ratio,
        "mask_scaling": cfg.mask_scaling,
        "gumbel_temperature": cfg.gumbel_temperature,
        "training": {
            "source": source,
            "task": cfg.task,
            "include_path": cfg.include_path,
            "data": cfg.data,
            "num_fewshot": cfg.num_fewshot,
            "apply_chat_template": cfg.apply_chat_template,
            "fewshot_as_multiturn": cfg.fewshot_as_multiturn,
            "n_train": len(train_pairs),
            "n_val": len(val_pairs),
            "epochs": cfg.epochs,
            "steps": total,
            "effective_batch_size": per_step,
            "micro_batch_size": micro,
            "lr": cfg.lr,
            "warmup_steps": warmup,
            "seed": cfg.seed,
            "max_length": cfg.max_length,
            "block_length": block_length,  # of block-causal attention (LLaDA2); None: every position attends to all
            "lora": {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha} if cfg.lora else None,
            "init_profile": cfg.init_profile,
            "init_skipped_blocks": init_blocks,  # 0-based, started skipped (--init-profile)
        },
    }
    log_lines = resumed_log(out, start) if cfg.resume else []
    if cfg.resume and accelerator.is_main_process:  # the log continues from the checkpoint, one row per point
        write_atomically(out / "metrics.jsonl", lambda tmp: tmp.write_text("".join(line + "\n" for line in log_lines)))
    purge = (start + 1 if start else 0) if cfg.resume else None  # TensorBoard drops what the log drops
    writer = _tensorboard(out, purge) if accelerator.is_main_process else None

    def save(step: int, final: bool) -> None:
        if not accelerator.is_main_process:
            return
        unwrapped = accelerator.unwrap_model(objective)

        def extra(tmp: Path) -> None:
            save_train_state(tmp, step, optimizer, cfg, micro, None if budget is None else float(budget.offset))
            (tmp / "metrics.jsonl").write_text("".join(line + "\n" for line in log_lines))
            if (out / "tensorboard").exists():
                shutil.move(str(out / "tensorboard"), str(tmp / "tensorboard"))

        done = {**settings, "training": {**settings["training"], "completed_steps": step, "finished": final}}
        if budget is not None:
            done["budget"] = {"target_ratio": cfg.target_ratio, "dual_lr": cfg.dual_lr, "dual_offset": float(budget.offset),
                              **(budget_result if final else {})}
        save_routers(out, unwrapped.routers, identity, done, metrics, unwrapped.backbone if cfg.lora else None, extra)

    def record(entry: dict) -> None:
        if accelerator.is_main_process:
            line = json.dumps(entry)
            log_lines.append(line)
            out.mkdir(parents=True, exist_ok=True)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(line + "\n")
            if writer is not None:
                for k, v in entry.items():
                    if k != "step" and isinstance(v, (int, float)):
                        writer.add_scalar(k, v, entry["step"])

    def validated(routers: Routers | None = None, draws: int = VALIDATION_DRAWS) -> dict:
        unwrapped = accelerator.unwrap_model(objective)
        return validate(unwrapped.backbone, routers or unwrapped.routers, val_pairs, micro, cfg.seed, mcfg.mask_token_id,
                        pad_id, block_length, draws)

    if start == 0 and val_pairs:
        record({"step": 0, **validated()})
    bar = tqdm(total=total, initial=start, disable=not accelerator.is_main_process, desc="dlmskip train")
    tic, seen = time.time(), 0
    for step in range(start, total):
        examples = step_examples(train_pairs, step, per_step, cfg.seed)
        first = accelerator.process_index * accumulation  # this rank's micro-batches of the step
        batches = [collate(examples[(first + k) * micro : (first + k + 1) * micro], pad_id).to(device) for k in range(accumulation)]
        seeds = [(cfg.seed * 1_000_003 + step) * 100_003 + first + k for k in range(accumulation)]  # the same for any process count
        lr = cfg.lr * lr_factor(step, warmup, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        stats = train_step(objective, accelerator, optimizer, params, batches, seeds, cfg.grad_clip)
        if world > 1 and budget is not None:  # every process steps mu on the mean over all of them
            stats = accelerator.reduce(stats, reduction="mean")
        if budget is not None:
            budget.update(stats[STATS.index("decided_execution")], accelerator.unwrap_model(objective).routers)
        seen += per_step
        if (step + 1) % cfg.log_every == 0 or step + 1 == total:
            if world > 1 and budget is None:  # log the mean over all processes
                stats = accelerator.reduce(stats, reduction="mean")
            sums = dict(zip(STATS, stats.tolist()))  # sync: once per logged step
            rate = seen / (time.time() - tic)
            entry = {"step": step + 1, "epoch": (step + 1) * per_step / len(train_pairs), **sums,
                     "execution_ratio": 1 - sums["alpha"], "lr": lr, "examples_per_s": rate}
            if budget is not None:
                entry["budget_offset"] = float(budget.offset)  # sync: once per logged step
            record(entry)
            bar.set_postfix(loss=f"{sums['loss']:.3f}", exec=f"{1 - sums['alpha']:.3f}", ex_s=f"{rate:.1f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == total:
            metrics = validated()
            if metrics:
                record({"step": step + 1, **metrics})
        if (step + 1) % cfg.save_every == 0 and step + 1 < total:
            save(step + 1, final=False)
        bar.update(1)
    bar.close()
    if budget is not None:
        routers_now = accelerator.unwrap_model(objective).routers
        calibration = calibrated(routers_now, lambda trial: validated(trial, CALIBRATION_DRAWS)["val_execution_ratio"],
                                 cfg.target_ratio)
        metrics = validated()
        record({"step": total, "calibration_offset": calibration.offset, **metrics})
        budget_result = {"achieved_ratio": calibration.ratio, "uncalibrated_ratio": calibration.start_ratio,
                         "calibration_offset": calibration.offset, "measured_on": f"{len(val_pairs)} held-out examples "
                         f"x {CALIBRATION_DRAWS} masked draws (l of T stratified), in the evaluation dtype"}
    save(total, final=True)
    warning = too_short_warning(log_lines, total, warmup, cfg) if accelerator.is_main_process else None
    if warning:
        log.warning(warning)
    accelerator.wait_for_everyone()
    if writer is not None:
        writer.close()
    return metrics


UNMOVED = 0.01  # a held-out execution ratio within this of its start: the routers did not move


def too_short_warning(log_lines: list[str], total: int, warmup: int, cfg: TrainConfig) -> str | None:
    """What to change when a run asked to skip blocks ended with its routers where they began (the
    held-out execution ratio of the last validation within 0.01 of step 0's), or inside its warmup.
    The defaults are the paper's recipe for an 8B model over 10 epochs; a short run on a small
    model learns nothing with them."""
    entries = [json.loads(line) for line in log_lines]
    val = [e["val_execution_ratio"] for e in entries if "val_execution_ratio" in e]
    asked = cfg.target_ratio is not None or (cfg.lam > 0 and cfg.alpha_target > 0)
    unmoved = asked and len(val) > 1 and abs(val[-1] - val[0]) < UNMOVED
    in_warmup = total <= warmup
    if not (unmoved or in_warmup):
        return None
    found = []
    if unmoved:
        found.append(f"the held-out execution ratio is {val[-1]:.3f} after {total} steps, as at the start "
                     f"({val[0]:.3f}): the routers skip no more than before training")
    if in_warmup:
        found.append(f"all {total} steps were warmup ({warmup} steps), so the learning rate never reached --lr {cfg.lr:g}")
    return (
        "dlmskip train: this run was too short to move the routers: " + "; ".join(found) + ". "
        f"Raise --lr (the default 5e-5 is the paper's for an 8B model over 10 epochs; the demo model learns at 1e-2), "
        f"train longer (--max-steps, now {total}, or --epochs), and keep the warmup a small part of the run "
        f"(--warmup-steps, now {warmup}, or --warmup-epochs). docs/demo/README.md has a recipe for a small model."
    )


def _tensorboard(out: Path, purge_step: int | None):
    """TensorBoard's writer where tensorboard is installed; events at ``purge_step`` and later that an
    earlier, stopped run wrote are withdrawn (None: a new run)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"), purge_step=purge_step)
