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

import argparse
import copy
import json
import logging
import math
import os
import random
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .files import check_output_dir, write_atomically
from .loading import load_model, load_tokenizer, model_identity
from .model import LLaDA
from .router import GumbelRouting, RoutedSkip, RouterConfig, Routers, save_routers
from .train_data import Pair, add_source_arguments, encode_pairs, jsonl_texts, split_validation, task_texts, tokenizer_chat_template

log = logging.getLogger("lm_eval_dlmskip.train")

# Settings a resumed run may change; any other difference is refused. The output path is where the
# run lies, not how it trains: a copied or moved run folder resumes.
_RESUMABLE_CHANGES = {"epochs", "max_steps", "save_every", "eval_every", "log_every", "resume", "output"}
# What a run stopped before its first checkpoint leaves in its folder.
_BEFORE_FIRST_SAVE = {"metrics.jsonl", "tensorboard"}


@dataclass(frozen=True)
class TrainConfig:
    model: str
    output: str
    task: str | None = None
    include_path: str | None = None
    data: str | None = None
    num_fewshot: int | None = None  # None: the task's own
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False
    revision: str = "main"
    lam: float = 0.1
    alpha_target: float = 0.5
    tau: float = 0.1
    mask_scaling: bool = True
    gumbel_temperature: float = 1.0
    router_hidden: int | None = None  # None: d_model / 8 (512 on LLaDA-8B)
    router_depth: int = 2
    norm_first: bool = False
    init_bias: float = 4.0
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: int = 16
    epochs: float = 10.0
    max_steps: int | None = None
    batch_size: int | None = None  # examples per micro-batch and process; None: the largest that fits
    effective_batch_size: int = 64
    lr: float = 5e-5
    warmup_epochs: float = 2.0
    warmup_steps: int | None = None
    weight_decay: float = 0.02
    grad_clip: float = 1.0
    max_length: int = 1024
    min_mask_ratio: float = 1e-3  # LLaDA's eps: p_mask = (1 - eps) t + eps
    seed: int = 0
    val_fraction: float = 0.05
    eval_every: int = 100
    save_every: int = 500
    log_every: int = 10
    dtype: str = "bfloat16"
    device: str | None = None
    resume: bool = False

    def check(self) -> None:
        if (self.task is None) == (self.data is None):
            raise ValueError("give exactly one of --task NAME or --data FILE.jsonl")
        if self.data is not None and (self.num_fewshot is not None or self.apply_chat_template):
            raise ValueError("--num-fewshot and --apply-chat-template render --task prompts; --data prompts are used as written")
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise ValueError("--fewshot-as-multiturn needs --apply-chat-template (as in lm_eval)")
        if not 0 <= self.alpha_target <= 1:
            raise ValueError(f"--alpha-target {self.alpha_target} must be in [0, 1]")
        if self.lam < 0:
            raise ValueError(f"--lambda {self.lam} must be >= 0")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"--batch-size {self.batch_size} must be >= 1 (or left out: the largest that fits)")
        if self.batch_size is not None and self.effective_batch_size % self.batch_size:
            raise ValueError(f"--effective-batch-size {self.effective_batch_size} is not a multiple of --batch-size {self.batch_size}")


# ---- the objective ---------------------------------------------------------------------------
@dataclass
class Batch:
    ids: Tensor  # [b, L] prompt + target, right-padded
    attention_mask: Tensor | None
    target: Tensor  # [b, L] bool: target positions
    target_len: Tensor  # [b]

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(None if t is None else t.to(device) for t in vars(self).values()))


def collate(pairs: list[Pair], pad_id: int) -> Batch:
    L = max(len(p.prompt) + len(p.target) for p in pairs)
    ids = torch.full((len(pairs), L), pad_id, dtype=torch.long)
    target = torch.zeros(len(pairs), L, dtype=torch.bool)
    attention = torch.zeros(len(pairs), L, dtype=torch.long)
    for i, p in enumerate(pairs):
        n = len(p.prompt) + len(p.target)
        ids[i, :n] = torch.tensor(p.prompt + p.target)
        target[i, len(p.prompt) : n] = True
        attention[i, :n] = 1
    return Batch(ids, None if bool(attention.all()) else attention, target, target.sum(1))


class RouterObjective(nn.Module):
    """Frozen backbone + routers; forward gives the paper's loss for one micro-batch."""

    def __init__(self, backbone: nn.Module, routers: Routers, cfg: TrainConfig, mask_id: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.routers = routers
        self.cfg = cfg
        self.mask_id = mask_id

    def forward(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        cfg, device = self.cfg, batch.ids.device
        b = batch.ids.shape[0]
        t = torch.rand(b, 1, device=device, generator=generator)
        p_mask = (1 - cfg.min_mask_ratio) * t + cfg.min_mask_ratio
        masked = batch.target & (torch.rand(batch.ids.shape, device=device, generator=generator) < p_mask)
        noisy = torch.where(masked, self.mask_id, batch.ids)
        positions = masked.flatten().nonzero().squeeze(1)  # sync: the count sizes the LM head
        routing = GumbelRouting(self.routers, cfg.gumbel_temperature, generator)
        logits, _ = self.backbone(noisy, batch.attention_mask, policy=routing, logits_at=positions)
        ce = F.cross_entropy(logits.float(), batch.ids.flatten()[positions], reduction="none")
        ce_row = torch.zeros(b, device=device).index_add_(0, positions // batch.ids.shape[1], ce) / batch.target_len
        alpha = routing.alpha()
        skip_loss = (alpha - cfg.alpha_target).abs()
        p = p_mask.squeeze(1)
        if cfg.mask_scaling:
            loss = (ce_row + cfg.lam * skip_loss) / p
        else:
            loss = ce_row / p + cfg.lam * skip_loss
        stats = {"ce": ce_row.mean().detach(), "skip_loss": skip_loss.mean().detach(), "alpha": alpha.mean().detach()}
        return loss.mean(), stats


def validation_batches(pairs: list[Pair], batch_size: int, seed: int, pad_id: int) -> Iterator[tuple[Batch, Tensor]]:
    """The held-out forwards: every example at mask ratios 0.25, 0.5, 0.75 and 1.0, with fixed
    masks; yields each batch and its [b, L] bool mask (on the host)."""
    generator = torch.Generator().manual_seed(seed + 1)
    for start in range(0, len(pairs), batch_size):
        batch = collate(pairs[start : start + batch_size], pad_id)
        for ratio in (0.25, 0.5, 0.75, 1.0):
            masked = batch.target & (torch.rand(batch.ids.shape, generator=generator) < ratio)
            yield batch, masked


@torch.no_grad()
def validate(backbone: LLaDA, routers: Routers, pairs: list[Pair], batch_size: int, seed: int, mask_id: int, pad_id: int) -> dict:
    """Masked CE and execution ratio as evaluation will measure them: the routers cast to the
    model's dtype (as the harness loads a checkpoint), the model in that dtype without autocast,
    and RoutedSkip's decisions (argmax votes, hard tau). Training's bf16 autocast over float32
    routers flips near-tied votes, so its own ratio is not what lm-eval sees."""
    if not pairs:
        return {}
    device, dtype = backbone.device, backbone.dtype
    policy = RoutedSkip(copy.deepcopy(routers).to(dtype).eval(), routers.cfg.tau)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # [CE, executed share], summed over rows
    tokens, forwards = 0, 0
    for batch, masked in validation_batches(pairs, batch_size, seed, pad_id):
        noisy, positions = torch.where(masked, mask_id, batch.ids), masked.flatten().nonzero().squeeze(1)
        mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
        logits, trace = backbone(noisy.to(device), mask, policy=policy, logits_at=positions.to(device))
        sums[0] += F.cross_entropy(logits.float(), batch.ids.flatten()[positions].to(device), reduction="sum")
        sums[1] += trace.executed.double().mean(1).sum()
        tokens += len(positions)
        forwards += len(masked)
    ce, executed = sums.tolist()  # sync: once per validation
    return {"val_ce": ce / max(tokens, 1), "val_execution_ratio": executed / forwards, "val_dtype": str(dtype).removeprefix("torch.")}


# ---- the loop ----------------------------------------------------------------------------------
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
    worst = RouterObjective(objective.backbone, objective.routers, replace(objective.cfg, min_mask_ratio=1.0), objective.mask_id)

    def fits(size: int) -> None:
        batch = collate([longest] * size, pad_id).to(accelerator.device)
        with accelerator.autocast():
            loss, _ = worst(batch, torch.Generator(accelerator.device).manual_seed(0))
        loss.backward()
        objective.zero_grad(set_to_none=True)

    return fits


def train_step(objective: nn.Module, accelerator, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
               batches: list[Batch], seeds: list[int], grad_clip: float) -> Tensor:
    """One optimizer step over this process's micro-batches; returns the step's mean
    [loss, ce, skip_loss, alpha] on the device, read back only at logging steps."""
    stats = torch.zeros(4, device=accelerator.device)
    for micro, (batch, seed) in enumerate(zip(batches, seeds)):
        generator = torch.Generator(accelerator.device).manual_seed(seed)
        last = micro == len(batches) - 1
        with (nullcontext() if last else accelerator.no_sync(objective)), accelerator.autocast():
            loss, parts = objective(batch, generator)
            accelerator.backward(loss / len(batches))  # gradients all-reduced on the last micro-batch
        stats += torch.stack([loss.detach(), parts["ce"], parts["skip_loss"], parts["alpha"]]).float() / len(batches)
    accelerator.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stats


def save_train_state(out: Path, step: int, optimizer: torch.optim.Optimizer, cfg: TrainConfig, micro_batch: int) -> None:
    """Optimizer moments as safetensors (no pickle), the position and the micro-batch as JSON."""
    state = optimizer.state_dict()
    tensors = {
        f"optimizer.{index}.{key}": value.detach().cpu().contiguous()
        for index, moments in state["state"].items()
        for key, value in moments.items()
        if isinstance(value, Tensor)
    }
    save_file(tensors, str(out / "train_state.safetensors"))
    groups = [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]]
    meta = {"step": step, "micro_batch_size": micro_batch, "param_groups": groups, "config": asdict(cfg)}
    (out / "train_state.json").write_text(json.dumps(meta, indent=2))


def load_train_state(out: Path, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> tuple[int, int]:
    """The step to continue from and the micro-batch size to keep (the random draws depend on it)."""
    meta = json.loads((out / "train_state.json").read_text())
    differ = [f for f, v in meta["config"].items() if f not in _RESUMABLE_CHANGES and getattr(cfg, f) != v]
    if differ:
        raise ValueError(f"--resume: {out} was trained with other settings ({', '.join(differ)}); resume with the same ones")
    tensors = load_file(str(out / "train_state.safetensors"))
    state = optimizer.state_dict()
    moments: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".")
        moments.setdefault(int(index), {})[name] = value
    state["state"] = moments
    for group, saved in zip(state["param_groups"], meta["param_groups"]):
        group.update(saved)
    optimizer.load_state_dict(state)
    return int(meta["step"]), int(meta.get("micro_batch_size", meta["config"]["batch_size"]))


def check_run_folder(out: Path, resume: bool) -> bool:
    """Whether ``out`` holds a checkpoint to continue; refuses a folder a run cannot start or
    resume in. A folder with only the log of a run stopped before its first save resumes from step 0."""
    check_output_dir(out, "--output")
    if (out / "train_state.json").exists():
        if not resume:
            raise ValueError(f"--output {out} exists and is not empty; pass --resume to continue it or choose another path")
        return True
    contents = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if contents and not contents <= _BEFORE_FIRST_SAVE:
        what = "holds no training state (train_state.json) to resume from" if resume else "exists and is not empty"
        raise ValueError(f"--output {out} {what}; choose another path")
    if contents and not resume:
        raise ValueError(f"--output {out} holds only the log of a run stopped before its first checkpoint; pass "
                         "--resume to start it again from step 0 (its log restarts), or choose another path")
    if resume and not out.is_dir():
        raise ValueError(f"--resume: {out} does not exist; give the --output folder of the run to continue")
    return False


def resumed_log(out: Path, step: int) -> list[str]:
    """The log rows a run resumed at ``step`` keeps: those up to its checkpoint (rows written after
    the save are logged again); none from step 0, whose validation is logged again."""
    path = out / "metrics.jsonl"
    if step == 0 or not path.exists():
        return []
    return [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]


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

    checkpoint = load_model(cfg.model, cfg.revision, dtype=cfg.dtype if cuda else "float32", device=device)
    backbone = checkpoint.model.requires_grad_(False)
    mcfg = backbone.cfg
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
    routers = Routers(RouterConfig(mcfg.d_model, mcfg.n_layers, cfg.router_hidden, cfg.router_depth, cfg.norm_first, cfg.init_bias, cfg.tau)).to(device)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"]
        backbone = get_peft_model(backbone, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=[f"blocks.{i}.{t}" for i in range(mcfg.n_layers) for t in targets]))
    objective = RouterObjective(backbone, routers, cfg, mcfg.mask_token_id)
    params = [p for _, p in trainable(objective)]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    start, micro, metrics = 0, cfg.batch_size, {}
    if saved:
        state = load_file(str(out / "router.safetensors"), device=str(device))
        routers.load_state_dict(state)
        if cfg.lora:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(backbone, load_file(str(out / "adapter" / "adapter_model.safetensors"), device=str(device)))
        start, micro = load_train_state(out, optimizer, cfg)
        metrics = json.loads((out / "router.json").read_text())["metrics"]  # kept until the next validation
        log.info("resuming %s at step %d of %d", out, start, total)
    elif cfg.resume:
        log.info("resuming %s from step 0: it stopped before its first checkpoint", out)
    micro = micro or auto_micro_batch(objective, train_pairs, per_step // world, pad_id, accelerator)
    accumulation = per_step // (micro * world)
    objective = accelerator.prepare(objective)  # DDP syncs only parameters that require grad

    identity = model_identity(mcfg, cfg.model, checkpoint.fingerprint)
    settings = {
        "lambda": cfg.lam,
        "alpha_target": cfg.alpha_target,
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
            "lora": {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha} if cfg.lora else None,
        },
    }
    log_lines = resumed_log(out, start) if cfg.resume else []
    if cfg.resume and accelerator.is_main_process:  # the log continues from the checkpoint, one row per point
        write_atomically(out / "metrics.jsonl", lambda tmp: tmp.write_text("".join(line + "\n" for line in log_lines)))
    writer = _tensorboard(out) if accelerator.is_main_process else None

    def save(step: int, final: bool) -> None:
        if not accelerator.is_main_process:
            return
        unwrapped = accelerator.unwrap_model(objective)

        def extra(tmp: Path) -> None:
            save_train_state(tmp, step, optimizer, cfg, micro)
            (tmp / "metrics.jsonl").write_text("".join(line + "\n" for line in log_lines))
            if (out / "tensorboard").exists():
                shutil.move(str(out / "tensorboard"), str(tmp / "tensorboard"))

        done = {**settings, "training": {**settings["training"], "completed_steps": step, "finished": final}}
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

    def validated() -> dict:
        unwrapped = accelerator.unwrap_model(objective)
        return validate(unwrapped.backbone, unwrapped.routers, val_pairs, micro, cfg.seed, mcfg.mask_token_id, pad_id)

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
        seen += per_step
        if (step + 1) % cfg.log_every == 0 or step + 1 == total:
            if world > 1:  # log the mean over all processes
                stats = accelerator.reduce(stats, reduction="mean")
            sums = dict(zip(("loss", "ce", "skip_loss", "alpha"), stats.tolist()))  # sync: once per logged step
            rate = seen / (time.time() - tic)
            entry = {"step": step + 1, "epoch": (step + 1) * per_step / len(train_pairs), **sums,
                     "execution_ratio": 1 - sums["alpha"], "lr": lr, "examples_per_s": rate}
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
    asked = cfg.lam > 0 and cfg.alpha_target > 0
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


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


# ---- command line ------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model", required=True, help="LLaDA hub id or checkpoint directory (the frozen backbone)")
    a("--output", required=True, help="router checkpoint directory to write (e.g. router_ckpts/gsm8k-l0.3)")
    add_source_arguments(parser, "lm-eval task whose training split (else validation split) is the data",
                         "JSONL file with prompt/target fields, instead of --task")
    a("--num-fewshot", type=int, help="few-shot examples in each --task prompt (default: the task's own num_fewshot, "
                                       "as lm_eval); drawn from the task's few-shot split, never the example itself")
    a("--apply-chat-template", action="store_true", help="render --task prompts with the tokenizer's chat template, as lm_eval's flag")
    a("--fewshot-as-multiturn", action="store_true", help="few-shot examples as chat turns, as lm_eval's flag")
    a("--revision", default="main")
    a("--lambda", dest="lam", type=float, default=0.1, help="weight of the skip loss |alpha - alpha_target|")
    a("--alpha-target", type=float, default=0.5, help="target share of skipped blocks")
    a("--tau", type=float, default=0.1, help="skip a block when the share of skip votes exceeds tau")
    a("--no-mask-scaling", dest="mask_scaling", action="store_false", help="do not divide the skip loss by p_mask (ablation)")
    a("--gumbel-temperature", type=float, default=1.0)
    a("--router-hidden", type=int, help="router MLP width (default d_model / 8: 512 on LLaDA-8B, as in the paper)")
    a("--router-depth", type=int, default=2, help="linear layers per router (2 as in the paper; 4 also tried)")
    a("--norm-first", action="store_true", help="RMSNorm(d) -> Linear -> SiLU -> Linear instead of D-LLM's order")
    a("--init-bias", type=float, default=4.0, help="execute-minus-skip logit bias at start (all blocks run)")
    a("--lora", action="store_true", help="also train LoRA adapters on the blocks (peft)")
    a("--lora-rank", type=int, default=8)
    a("--lora-alpha", type=int, default=16)
    a("--epochs", type=float, default=10.0)
    a("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    a("--batch-size", type=int, help="examples per micro-batch and process (default: on a GPU the largest that fits, "
                                      "probed; 4 on a CPU; recorded in router.json, as the random draws depend on it)")
    a("--effective-batch-size", type=int, default=64, help="examples per optimizer step, all processes together")
    a("--lr", type=float, default=5e-5)
    a("--warmup-epochs", type=float, default=2.0)
    a("--warmup-steps", type=int)
    a("--weight-decay", type=float, default=0.02)
    a("--grad-clip", type=float, default=1.0)
    a("--max-length", type=int, default=1024)
    a("--seed", type=int, default=0)
    a("--val-fraction", type=float, default=0.05)
    a("--eval-every", type=int, default=100)
    a("--save-every", type=int, default=500)
    a("--log-every", type=int, default=10)
    a("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    a("--device", choices=["cuda", "cpu"])
    a("--resume", action="store_true", help="continue the run in --output from its last saved step")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def run_train(args: argparse.Namespace, argv: list[str]) -> int:
    """Train; then say where the routers went and how lm_eval uses them. Ctrl-C (exit 130) says
    how to resume from the last checkpoint, or that none was saved yet. ``argv``: the train arguments."""
    cfg = config_from_args(args)
    out = Path(cfg.output).resolve()
    first_process = os.environ.get("RANK", "0") == "0"  # under accelerate launch, one process speaks
    try:
        metrics = train(cfg)
    except KeyboardInterrupt:
        if first_process:
            print(interrupted_message(cfg, argv), file=sys.stderr)
        return 130
    print(json.dumps(metrics))
    if not first_process:
        return 0
    model = Path(cfg.model).resolve() if Path(cfg.model).expanduser().is_dir() else cfg.model
    family = json.loads((out / "router.json").read_text())["base_model"]["family"]
    print(f"router checkpoint: {out}\nevaluate with it: lm_eval --model {family}_skip "
          f"--model_args 'pretrained={model},router={out}' --tasks TASKS")
    return 0


def resume_command(run: Path) -> str:
    """The ``dlmskip train`` command that continues the run in ``run`` (where it lies now), from
    the settings its checkpoint saved: each one that differs from its option's default."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    state = run / "train_state.json"
    if not state.exists():
        return f"dlmskip train --output {shlex.quote(str(run))} --resume, with the other arguments it was started with"
    config = {**json.loads(state.read_text())["config"], "output": str(run)}
    words = ["dlmskip", "train"]
    for action in parser._actions:  # argparse keeps each option's flag and default only here
        value = config.get(action.dest, action.default)
        if not action.option_strings or action.dest == "resume" or value == action.default:
            continue
        words += [action.option_strings[0]] if action.nargs == 0 else [action.option_strings[0], str(value)]
    return shlex.join([*words, "--resume"])


def interrupted_message(cfg: TrainConfig, argv: list[str]) -> str:
    out = Path(cfg.output).resolve()
    again = shlex.join(["dlmskip", "train", *[a for a in argv if a != "--resume"]])
    state = out / "train_state.json"
    if state.exists():
        step = json.loads(state.read_text())["step"]
        return (f"dlmskip train: interrupted; the last checkpoint ({out}) holds step {step}. "
                f"Continue it with:\n  {again} --resume")
    before = f"dlmskip train: interrupted before the first checkpoint (every --save-every {cfg.save_every} steps)"
    if out.is_dir():
        return f"{before}. Start it again from step 0 with:\n  {again} --resume"
    return f"{before}; nothing was written. Start again with:\n  {again}"


def main(argv: list[str] | None = None) -> int:
    from .cli import HelpFormatter

    parser = argparse.ArgumentParser(prog="dlmskip train", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return run_train(args, argv)


if __name__ == "__main__":
    sys.exit(main())
