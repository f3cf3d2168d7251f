"""Router checkpoints: a directory holding ``router.safetensors`` (weights, no pickle) and
``router.json`` (format, the base model's identity, router shape, training settings and metrics),
plus ``adapter/`` when LoRA adapters were trained with the routers. Written atomically; loading
one into a model it was not trained for is a clear error."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..common.files import write_directory_atomically
from .identity import check_identity
from .routers import RouterConfig, Routers

FORMAT_VERSION = 1


def save_routers(
    path: str | Path,
    routers: Routers,
    identity: dict[str, Any],
    settings: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    lora_model: nn.Module | None = None,
    extra: Callable[[Path], None] | None = None,
) -> None:
    """Write a router checkpoint directory atomically; ``extra(tmp)`` adds files to it (the
    trainer's resumable state and logs)."""
    meta = {
        "format": FORMAT_VERSION,
        "kind": "lm_eval_dlmskip.router",
        "base_model": identity,
        "router": {k: v for k, v in asdict(routers.cfg).items() if k not in ("d_model", "n_layers")},
        "n_layers": routers.cfg.n_layers,
        "d_model": routers.cfg.d_model,
        "tau": routers.cfg.tau,
        **settings,
        "metrics": metrics or {},
        "lora": lora_model is not None,
    }
    state = {k: v.detach().float().contiguous().cpu() for k, v in routers.state_dict().items()}

    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / "router.safetensors"), metadata={"format": "pt"})
        (tmp / "router.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        if lora_model is not None:
            lora_model.save_pretrained(str(tmp / "adapter"))
        if extra is not None:
            extra(tmp)

    write_directory_atomically(Path(path), fill)


@dataclass(frozen=True)
class RouterCheckpoint:
    routers: Routers
    meta: dict[str, Any]
    path: Path

    @property
    def adapter(self) -> Path | None:
        return self.path / "adapter" if self.meta.get("lora") else None


def resolve_router(router: str) -> Path:
    """A checkpoint directory, or a bare name looked up under ./router_ckpts/, that holds the
    checkpoint's two files (checked before any model is loaded)."""
    path = Path(router).expanduser()
    if not path.is_dir():
        named = Path("router_ckpts") / router
        if not named.is_dir():
            raise ValueError(f"router={router!r}: no such checkpoint directory (also looked for {named}/)")
        path = named
    for needed in ("router.json", "router.safetensors"):
        if not (path / needed).exists():
            raise ValueError(f"router={router!r}: {needed} is missing; is this a router checkpoint?")
    return path


def router_digest(path: Path) -> str:
    """sha256 of a router checkpoint's weights and LoRA adapter (those present): what it computes,
    whatever folder it lies in (a router retrained in place keeps its path)."""
    digest = hashlib.sha256()
    for file in (path / "router.safetensors", path / "adapter" / "adapter_model.safetensors"):
        if file.exists():
            digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()[:16]


def load_routers(
    router: str | Path,
    cfg: Any,  # the model config (n_layers, d_model, family)
    fingerprint: str,
    tau: float | None = None,
    allow_mismatch: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    tokenizer: str | None = None,
) -> RouterCheckpoint:
    """Read a router checkpoint and check it was trained for this model (weights ``fingerprint``,
    config ``cfg``, tokenizer fingerprint ``tokenizer``: see identity.py). The routers run in the
    model's dtype (as they were trained under bf16 autocast): a float32 router on bf16 hidden
    states would cost as much as a small block on a GPU."""
    path = resolve_router(str(router))
    meta_file, weights = path / "router.json", path / "router.safetensors"
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_file}: not valid JSON ({err}); the checkpoint is damaged, retrain or re-copy it") from err
    if meta.get("kind") != "lm_eval_dlmskip.router" or meta.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{meta_file}: not a router checkpoint of format {FORMAT_VERSION} "
            f"(kind={meta.get('kind')!r}, format={meta.get('format')!r})"
        )
    check_identity(meta["base_model"], cfg, fingerprint, allow_mismatch, f"router={str(router)!r} was trained for", tokenizer)
    rcfg = RouterConfig(d_model=cfg.d_model, n_layers=cfg.n_layers, **{**meta["router"], **({"tau": tau} if tau is not None else {})})
    routers = Routers(rcfg)
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights}: not a readable safetensors file ({err}); the checkpoint is damaged") from err
    expected = {k: tuple(v.shape) for k, v in routers.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))[:5]
        unexpected = sorted(set(got) - set(expected))[:5]
        raise ValueError(f"{weights}: weights do not match router.json (missing {missing}, unexpected {unexpected})")
    routers.load_state_dict(state, strict=True)
    return RouterCheckpoint(routers.to(device=device, dtype=dtype).eval(), meta, path)
