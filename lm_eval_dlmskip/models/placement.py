"""A model split over the devices of one host (``parallelize=True``, as lm-eval's HF model does it):
accelerate chooses where whole blocks go from their sizes and the memory each device may use; the
weights are then read straight onto those devices and the block loop moves the hidden states (and
what the blocks share) from device to device. Each block's KV cache lives with the block."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import LLaDAConfig
from .llada import LLaDA

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass(frozen=True)
class Placement:
    """Where the embedding, each block and the head (final norm and LM head) live."""

    embed: torch.device
    blocks: tuple[torch.device, ...]
    head: torch.device

    @property
    def devices(self) -> list[torch.device]:
        return list(dict.fromkeys([self.embed, *self.blocks, self.head]))

    def device_of(self, name: str) -> torch.device:
        """The device of a state-dict key of our model (``wte.weight``, ``blocks.3.q_proj.weight``...)."""
        if name.startswith("blocks."):
            return self.blocks[int(name.split(".")[1])]
        return self.embed if name.startswith("wte.") else self.head


def gpu_memory(max_memory_per_gpu: int | str | None) -> dict[int | str, int | str]:
    """lm-eval's HF model's budget: ``max_memory_per_gpu`` on every visible GPU, or what each has free."""
    from accelerate.utils import get_max_memory

    if max_memory_per_gpu is not None:
        return {i: max_memory_per_gpu for i in range(torch.cuda.device_count())}
    return {k: v for k, v in get_max_memory().items() if k != "cpu"}


def plan_placement(
    cfg: LLaDAConfig, dtype: torch.dtype, max_memory: dict[int | str, int | str], strategy: str = "auto"
) -> Placement:
    """Whole blocks on the devices of ``max_memory`` (GPU index or "cpu" -> bytes or "10GiB"), in
    accelerate's order (GPUs first, then the CPU); ``strategy`` as transformers' ``device_map``
    ("auto" = "balanced": spread evenly; "sequential": fill GPU 0 first). A model that does not fit
    is refused: offloading to disk would read every weight from disk at every step."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if strategy not in STRATEGIES:
        raise ValueError(f"device_map={strategy!r} is not a placement strategy; use one of {', '.join(STRATEGIES)}")
    with torch.device("meta"):
        model = LLaDA(cfg).to(dtype)
    keep_whole = ["Block"]
    if strategy != "sequential":
        max_memory = get_balanced_memory(model, max_memory, keep_whole, dtype, low_zero=strategy == "balanced_low_0")
    device_map = infer_auto_device_map(model, max_memory, keep_whole, dtype)

    def device(name: str) -> torch.device:
        where = next(device_map[k] for k in sorted(device_map, key=len, reverse=True)
                     if name == k or name.startswith(k + ".") or k == "")
        if where == "disk":
            raise ValueError(f"the model does not fit in max_memory={max_memory} (accelerate would put {name} on disk); "
                             "raise max_memory_per_gpu / max_cpu_memory or use more GPUs")
        return torch.device(f"cuda:{where}" if isinstance(where, int) else where)

    embed = device("wte")
    # A tied LM head multiplies by the embedding's own weight: the head runs where that weight is.
    head = embed if cfg.weight_tying else device("ff_out")
    return Placement(embed, tuple(device(f"blocks.{i}") for i in range(cfg.n_layers)), head)
