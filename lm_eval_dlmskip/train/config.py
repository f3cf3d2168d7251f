"""The settings of a router training run (``TrainConfig``) and the ``dlmskip train`` options that
set them; the options a run was started with are saved so that it can be resumed."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from ..data import add_source_arguments

if TYPE_CHECKING:
    from ..models.config import LLaDAConfig
    from ..skipping.routers import RouterConfig

DEFAULT_LAMBDA, DEFAULT_ALPHA_TARGET = 0.1, 0.5  # the fixed-penalty recipe's, when no --target-ratio is given


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
    lam: float | None = None  # None: DEFAULT_LAMBDA without target_ratio (the paper's fixed penalty)
    alpha_target: float | None = None  # None: DEFAULT_ALPHA_TARGET without target_ratio
    target_ratio: float | None = None  # execution ratio to reach (budget.py); excludes lam and alpha_target
    dual_lr: float = 0.5  # step of the budget's execute-logit offset per unit of execution-ratio error (budget.py)
    calibrate_on: str | None = None  # --target-ratio's last calibration: "lm_eval" (None: with --task) or "held-out"
    eval_model_args: str | None = None  # the model_args the routers will be evaluated with (the lm_eval calibration's)
    tau: float = 0.1
    mask_scaling: bool = True
    gumbel_temperature: float = 1.0
    router_hidden: int | None = None  # None: d_model / 8 (512 on LLaDA-8B)
    router_depth: int = 2
    norm_first: bool = False
    init_bias: float = 4.0
    router_mask_ratio: bool = False  # routers also read each row's masking ratio (routers.py)
    init_profile: str | None = None  # skip profile (dlmskip calibrate) whose blocks start skipped
    init_k: int | None = None  # how many of its choices; None: the budget's share, else all
    keep_blocks: tuple[int, ...] = ()  # 0-based blocks that always run (no router decides them)
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
    block_length: int | None = None  # LLaDA2: the block length attention is block-causal in (None: 32, as decoding)
    min_mask_ratio: float = 1e-3  # LLaDA's eps: p_mask = (1 - eps) t + eps
    seed: int = 0
    val_fraction: float = 0.05
    eval_every: int = 100
    save_every: int = 500
    log_every: int = 10
    dtype: str = "bfloat16"
    device: str | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        if self.target_ratio is None:  # the fixed-penalty recipe: its defaults
            if self.lam is None:
                object.__setattr__(self, "lam", DEFAULT_LAMBDA)
            if self.alpha_target is None:
                object.__setattr__(self, "alpha_target", DEFAULT_ALPHA_TARGET)

    def calibration(self) -> str | None:
        """Where --target-ratio's last calibration measures: lm_eval's own forwards over held-out
        documents of the task, or the held-out training pairs (with --data)."""
        if self.target_ratio is None:
            return None
        return self.calibrate_on or ("lm_eval" if self.task is not None else "held-out")

    def check(self) -> None:
        if self.target_ratio is not None:
            check_target_ratio(self)
        if self.calibrate_on not in (None, "lm_eval", "held-out"):
            raise ValueError(f"--calibrate-on {self.calibrate_on!r}: give lm_eval or held-out")
        if self.target_ratio is None and (self.calibrate_on or self.eval_model_args):
            raise ValueError("--calibrate-on and --eval-model-args set --target-ratio's calibration; give --target-ratio too")
        if self.calibrate_on == "lm_eval" and self.data is not None:
            raise ValueError("--calibrate-on lm_eval runs the task's own requests; --data has no task: train with --task, "
                             "or calibrate on held-out pairs (--calibrate-on held-out)")
        if self.eval_model_args and self.calibration() != "lm_eval":
            raise ValueError("--eval-model-args are the lm_eval calibration's; they do nothing with --calibrate-on held-out or --data")
        if (self.task is None) == (self.data is None):
            raise ValueError("give exactly one of --task NAME or --data FILE.jsonl")
        if self.data is not None and (self.num_fewshot is not None or self.apply_chat_template):
            raise ValueError("--num-fewshot and --apply-chat-template render --task prompts; --data prompts are used as written")
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise ValueError("--fewshot-as-multiturn needs --apply-chat-template (as in lm_eval)")
        if self.alpha_target is not None and not 0 <= self.alpha_target <= 1:
            raise ValueError(f"--alpha-target {self.alpha_target} must be in [0, 1]")
        if self.lam is not None and self.lam < 0:
            raise ValueError(f"--lambda {self.lam} must be >= 0")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"--batch-size {self.batch_size} must be >= 1 (or left out: the largest that fits)")
        if self.init_k is not None and self.init_profile is None:
            raise ValueError("--init-k needs --init-profile PATH (a skip profile from dlmskip calibrate)")
        if self.init_profile is not None:
            from ..skipping.profiles import read_profile

            chosen = len(read_profile(self.init_profile)["selection_order"])
            if self.init_k is not None and not 0 <= self.init_k <= chosen:
                raise ValueError(f"--init-k {self.init_k}: the profile {self.init_profile} chose {chosen} blocks; give 0..{chosen}")
        if self.block_length is not None and self.block_length < 1:
            raise ValueError(f"--block-length {self.block_length} must be >= 1")
        if self.batch_size is not None and self.effective_batch_size % self.batch_size:
            raise ValueError(f"--effective-batch-size {self.effective_batch_size} is not a multiple of --batch-size {self.batch_size}")


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
    a("--lambda", dest="lam", type=float, help=f"weight of the skip loss |alpha - alpha_target| (the paper's fixed penalty; "
                                                 f"default {DEFAULT_LAMBDA}); not with --target-ratio")
    a("--alpha-target", type=float, help=f"target share of skipped blocks of the --lambda recipe (default {DEFAULT_ALPHA_TARGET})")
    a("--target-ratio", type=float, help="train to this execution ratio (fraction of blocks executed, the papers' normalized "
                                         "FLOPs), in (0, 1): an offset on the routers' execute logits follows the measured ratio (dual ascent) and "
                                         "a calibration on held-out documents lands it (--calibrate-on); instead of --lambda")
    a("--calibrate-on", choices=["lm_eval", "held-out"],
      help="with --target-ratio: the last calibration measures the execution ratio on lm_eval's own forwards over the "
           "task's held-out documents (default with --task: generation decodes them, multiple choice scores every "
           "choice, with --eval-model-args), or on masked forwards of the held-out pairs (default with --data)")
    a("--eval-model-args", help="with --target-ratio: the model_args you will evaluate the routers with, in lm_eval's "
                                "syntax (e.g. mc_num=8,cache=dual,threshold=0.9): the lm_eval calibration runs with them")
    a("--dual-lr", type=float, default=0.5, help="with --target-ratio: step of the routers' execute-logit offset per unit of execution-ratio error")
    a("--tau", type=float, default=0.1, help="skip a block when the share of skip votes exceeds tau")
    a("--no-mask-scaling", dest="mask_scaling", action="store_false", help="do not divide the skip loss by p_mask (ablation)")
    a("--gumbel-temperature", type=float, default=1.0)
    a("--router-hidden", type=int, help="router MLP width (default d_model / 8: 512 on LLaDA-8B, as in the paper)")
    a("--router-depth", type=int, default=2, help="linear layers per router (2 as in the paper; 4 also tried)")
    a("--norm-first", action="store_true", help="RMSNorm(d) -> Linear -> SiLU -> Linear instead of D-LLM's order")
    a("--init-bias", type=float, default=4.0, help="execute-minus-skip logit bias at start (all blocks run)")
    a("--router-mask-ratio", action="store_true", help="routers also read each row's masking ratio (masked / non-padding "
                                                       "positions), learned as r * w_r added to their first hidden layer")
    a("--init-profile", help="skip profile from dlmskip calibrate: its blocks' routers start voting skip (what static "
                             "skipping knows, for the routers to refine); how many: --init-k, else with --target-ratio "
                             "round((1 - R) x blocks) of its choices, else all")
    a("--init-k", type=int, help="with --init-profile: start its first K choices skipped")
    a("--keep-blocks", type=_blocks, default=(), help="0-based blocks that always run, e.g. 0,11: no router decides them "
                                                      "(the lowest --target-ratio is their share of the blocks)")
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
    a("--block-length", type=int, help="LLaDA2: the block length its attention is block-causal in while training and "
                                       "validating (default 32, decoding's; evaluate with the same block_length)")
    a("--seed", type=int, default=0)
    a("--val-fraction", type=float, default=0.05)
    a("--eval-every", type=int, default=100)
    a("--save-every", type=int, default=500)
    a("--log-every", type=int, default=10)
    a("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    a("--device", choices=["cuda", "cpu"])
    a("--resume", action="store_true", help="continue the run in --output from its last saved step")


def _blocks(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.replace(" ", ",").split(",") if b.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give 0-based block numbers, e.g. 0,11") from None


def budget_floor(cfg: TrainConfig, n_layers: int) -> float:
    """The lowest execution ratio the routers can reach: the share of blocks no router decides
    (a block whose router votes skip at every masked position is skipped by any tau < 1)."""
    return len(cfg.keep_blocks) / n_layers


def router_config(cfg: TrainConfig, model: LLaDAConfig) -> RouterConfig:
    """The routers' settings from the options and the model's config.json, checked before any weight
    is read: RouterConfig's own checks (the kept blocks exist, worded as for a router checkpoint),
    and --target-ratio above what the routers can reach."""
    from ..skipping.routers import RouterConfig  # imports torch: not when the CLI only parses options

    routers = RouterConfig(model.d_model, model.n_layers, cfg.router_hidden, cfg.router_depth, cfg.norm_first,
                           cfg.init_bias, cfg.tau, keep=cfg.keep_blocks, mask_ratio=cfg.router_mask_ratio)
    routers.check()
    floor = budget_floor(cfg, model.n_layers)
    if cfg.target_ratio is not None and cfg.target_ratio <= floor:
        raise ValueError(f"--target-ratio {cfg.target_ratio:g} is at or below what the routers can reach: "
                         f"{len(cfg.keep_blocks)} of {model.n_layers} blocks always run (--keep-blocks), so at least "
                         f"{floor:.4f} of the blocks execute; ask for more than {floor:.4f} or keep fewer blocks")
    return routers


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def check_target_ratio(cfg: TrainConfig) -> None:
    """--target-ratio's own checks, before anything is read: in (0, 1), not with the fixed
    penalty's settings, a positive --dual-lr."""
    target = cfg.target_ratio
    if not 0 < target < 1:
        raise ValueError(f"--target-ratio {target} must be in (0, 1): the fraction of blocks executed (0.75 = a quarter "
                         "of the block FLOPs saved); leave it out to run every block")
    if cfg.lam is not None or cfg.alpha_target is not None:
        given = " and ".join(f for f, v in (("--lambda", cfg.lam), ("--alpha-target", cfg.alpha_target)) if v is not None)
        raise ValueError(f"--target-ratio and {given} both given: --target-ratio sets the skip pressure itself; "
                         "give --target-ratio alone, or --lambda (and --alpha-target) for the paper's fixed penalty")
    if not cfg.dual_lr > 0:
        raise ValueError(f"--dual-lr {cfg.dual_lr} must be > 0")


def command_arguments(cfg: TrainConfig) -> list[str]:
    """The ``dlmskip train`` options of ``cfg`` that differ from their defaults, without --output and
    --resume (saved with the run, so that the command continuing it can be given later)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    words: list[str] = []
    defaults = TrainConfig(model="", output="", target_ratio=cfg.target_ratio)  # the recipe's own defaults
    for action in parser._actions:  # argparse keeps each option's flag and default only here
        value = getattr(cfg, action.dest, action.default)
        default = getattr(defaults, action.dest, action.default) if action.dest not in ("model", "output") else None
        if not action.option_strings or action.dest in ("resume", "output", "help") or value == default:
            continue
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)  # --keep-blocks 0,11
        words += [action.option_strings[0]] if action.nargs == 0 else [action.option_strings[0], text]
    return words
