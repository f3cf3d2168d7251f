"""From a hub id or a local directory to a ready model (LLaDA or Dream): config, sharded
safetensors, tokenizer.

Weights are read with safetensors only (no pickle, no code from the checkpoint); the model is
built on the meta device and the tensors are assigned name for name: LLaDA's after stripping the
upstream prefix ``model.transformer.``, Dream's (Qwen2 names) through a renaming table.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open

from ..common.families import FAMILIES
from .config import LLaDAConfig, diffusion_family, family_of
from .layouts import placements, stacked_shapes
from .llada import LLaDA
from .placement import Placement, plan_placement

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
_HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model", "*.jinja"]


@dataclass(frozen=True)
class Checkpoint:
    """A loaded model and where it came from (its identity goes into results and router files)."""

    model: LLaDA
    path: Path
    name: str  # what the user asked for: hub id or directory
    revision: str
    fingerprint: str  # sha256 over a sample of every weight, independent of the load dtype

    @property
    def hub_commit(self) -> str:
        """The commit of a hub download (its cache folder is snapshots/<commit>), else ''."""
        return self.path.name if self.path.parent.name == "snapshots" else ""


def local_directory(name: str, key: str = "pretrained") -> Path | None:
    """``name`` as an existing local directory, or None when it can only be a hub id; an error when
    it is neither (a file, or a missing path that is no 'org/name' id). Needs no network."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{key}={name!r} is a file; give the checkpoint directory that holds it")
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ValueError(
            f"{key}={name!r}: no such local directory (relative to {Path.cwd()}), and it is not "
            "a hub id of the form 'org/name'; check the path"
        )
    return None


def resolve_checkpoint(pretrained: str, revision: str = "main") -> Path:
    """A local directory as is, otherwise a hub id fetched (or found in the cache) by huggingface_hub."""
    path = local_directory(pretrained)
    if path is not None:
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(pretrained, revision=revision, allow_patterns=_HUB_FILES))
    except Exception as err:  # the hub client raises many types; all mean "not available here"
        raise ValueError(
            f"pretrained={pretrained!r}: not a local directory (relative to {Path.cwd()}), and as a hub id "
            f"(revision {revision!r}) not reachable on the Hugging Face hub nor in its local cache "
            f"({type(err).__name__}: {err}). If it is a path, check it for a typo; if it is a hub id, download it "
            f"where the hub is reachable (hf download {pretrained}) or pass its local directory."
        ) from err


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards of the index, or model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as err:
            raise ValueError(f"{index}: not a valid safetensors index ({err}); re-download the checkpoint") from err
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise ValueError(f"{path}: shard(s) {', '.join(missing)} named in {index.name} are missing; re-download")
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(p.name for p in path.iterdir())
    hint = " Only safetensors weights are loaded (no pickle); convert .bin files first." if any(
        n.endswith((".bin", ".pt", ".pth")) for n in found
    ) else ""
    raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json (found: {found}).{hint}")


def resolve_dtype(dtype: str | torch.dtype, cfg: LLaDAConfig, files: list[Path]) -> torch.dtype:
    """'auto' takes the checkpoint's declared dtype, else the dtype its tensors are stored in."""
    if isinstance(dtype, torch.dtype):
        return dtype
    check_dtype(dtype)
    if dtype != "auto":
        return DTYPES[dtype]
    if cfg.dtype in DTYPES:
        return DTYPES[cfg.dtype]
    with _open(files[0], "cpu") as f:
        stored = f.get_slice(next(iter(f.keys()))).get_dtype()
    return {"BF16": torch.bfloat16, "F16": torch.float16}.get(stored, torch.float32)


def check_dtype(dtype: str | torch.dtype) -> None:
    if not isinstance(dtype, torch.dtype) and dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use auto, bfloat16, float16 or float32")


def _open(file: Path, device: str):
    try:
        return safe_open(str(file), framework="pt", device=device)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{file}: not a readable safetensors file ({err}); re-download it") from err


def read_state_dict(
    files: list[Path], device: torch.device, dtype: torch.dtype, cfg: LLaDAConfig, placement: Placement | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """Tensors under our names (layouts.py), in ``dtype`` on ``device`` (or each on its device of
    ``placement``), experts stacked as they are read (no second copy of the weights); and a
    fingerprint of the upstream tensors."""
    state: dict[str, torch.Tensor] = {}
    digest = hashlib.sha256()
    read_on = "cpu" if device.type == "cpu" or placement is not None else str(device)  # safetensors refuses "cpu:0"
    for file in files:
        with _open(file, read_on) as f:
            for key in sorted(f.keys()):
                try:
                    tensor = f.get_tensor(key)
                except (SafetensorError, OSError, RuntimeError) as err:
                    raise ValueError(f"{file}: tensor {key!r} cannot be read ({err}); the file is corrupt") from err
                for name, index, part in placements(key, tensor, cfg):
                    if part.is_floating_point():
                        sample = part.flatten()[:: max(1, part.numel() // 256)].float().cpu()
                        digest.update(name.encode() + str(index).encode() * (index is not None) + sample.numpy().tobytes())
                        part = part.to(dtype)
                    if placement is not None:
                        part = part.to(placement.device_of(name))
                    if index is None:
                        state[name] = part
                    else:
                        shape = stacked_shapes(cfg)[name.split(".", 2)[2]]
                        state.setdefault(name, torch.zeros(shape, dtype=part.dtype, device=part.device))[index] = part
    return state, digest.hexdigest()[:16]


def read_config(path: Path, family: str | None = None) -> LLaDAConfig:
    """A checkpoint's config.json as our config; with ``family``, refuse another family's checkpoint
    (before any weight is read), naming the model to use instead."""
    config_file = path / "config.json"
    if not config_file.exists():
        raise ValueError(f"{path}: config.json is missing; this is not a model checkpoint directory")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}: not valid JSON ({err})") from err
    causal = [a for a in raw.get("architectures") or [] if str(a).endswith("ForCausalLM")]
    if family is not None and diffusion_family(raw) is None and causal:
        raise ValueError(
            f"{path}: expected {FAMILIES[family]}, found an autoregressive HF model ({causal[0]}, model_type="
            f"{raw.get('model_type')!r}): use --model hf_skip, which skips the layers of HF causal LMs"
        )
    found = family_of(raw)
    if family is not None and found != family:
        raise ValueError(
            f"{path}: expected {FAMILIES[family]}, found {FAMILIES[found]} (model_type={raw.get('model_type')}): "
            f"use --model {found}_skip"
        )
    cfg = LLaDAConfig.from_dict(raw)
    if cfg.mask_token_id < 0:  # LLaDA2 and LLaDA-MoE name their mask and EOS in the tokenizer only
        tokens = tokenizer_special_ids(path)
        if "mask_token" not in tokens:
            raise ValueError(f"{path}: the mask token id is neither in config.json (mask_token_id) nor in the "
                             "tokenizer (mask_token in tokenizer_config.json); add mask_token_id to config.json")
        cfg = replace(cfg, mask_token_id=tokens["mask_token"], eos_token_id=cfg.eos_token_id or tokens.get("eos_token"))
    return cfg


def tokenizer_special_ids(path: Path) -> dict[str, int]:
    """The ids of the special tokens tokenizer_config.json names (mask_token, eos_token, ...), read
    from tokenizer.json's added tokens without loading the tokenizer."""
    config_file, tokenizer_file = path / "tokenizer_config.json", path / "tokenizer.json"
    if not config_file.is_file() or not tokenizer_file.is_file():
        return {}
    config = json.loads(config_file.read_text())
    ids = {t["content"]: t["id"] for t in json.loads(tokenizer_file.read_text()).get("added_tokens", [])}
    found = {}
    for name in ("mask_token", "eos_token", "pad_token"):
        token = config.get(name)
        content = token.get("content") if isinstance(token, dict) else token
        if content in ids:
            found[name] = ids[content]
    return found


def load_model(
    pretrained: str,
    revision: str = "main",
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    family: str | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    device_map: str = "auto",
    placement: Placement | None = None,
) -> Checkpoint:
    """Load an upstream LLaDA or Dream checkpoint into the native model, in eval mode; ``family``
    ("llada", "dream") refuses the other one before its weights are read. With ``max_memory``
    (``parallelize=True``) whole blocks are spread over its devices (placement.py), or as
    ``placement`` says, each weight read onto its block's device; ``device`` is then ignored."""
    path = resolve_checkpoint(pretrained, revision)
    cfg = read_config(path, family)
    files = weight_files(path)
    torch_dtype = resolve_dtype(dtype, cfg, files)
    if max_memory is not None:
        placement = plan_placement(cfg, torch_dtype, max_memory, device_map)
    device = torch.device(device) if placement is None else placement.embed
    state, fingerprint = read_state_dict(files, device, torch_dtype, cfg, placement)
    with torch.device("meta"):
        model = LLaDA(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or unexpected or wrong:
        lines = [f"{path}: the weights do not match config.json"]
        lines += [f"  missing: {k} {expected[k]}" for k in missing[:10]]
        lines += [f"  unexpected: {k} {got[k]}" for k in unexpected[:10]]
        lines += [f"  shape: {k} is {got[k]}, config says {expected[k]}" for k in wrong[:10]]
        raise ValueError("\n".join(lines))
    model.load_state_dict(state, strict=True, assign=True)
    model.fuse_projections()
    where = str(device)
    if placement is not None and len(placement.devices) > 1:
        model.block_devices = placement.blocks
        where = ", ".join(f"{d}: {sum(b == d for b in placement.blocks)} blocks" for d in placement.devices)
        where += f"; embedding on {placement.embed}, head on {placement.head}"
    log.info("loaded %s %s (%d blocks, %s, %s) fingerprint %s", FAMILIES[cfg.family], pretrained, cfg.n_layers,
             torch_dtype, where, fingerprint)
    return Checkpoint(model.eval(), path, pretrained, revision, fingerprint)


def load_llada(
    pretrained: str, revision: str = "main", dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu"
) -> Checkpoint:
    """``load_model`` for a checkpoint that must be LLaDA."""
    return load_model(pretrained, revision, dtype, device, family="llada")


def load_tokenizer(path: Path, mask_id: int):
    """The checkpoint's own tokenizer; LLaDA adds no BOS and needs a pad id that is not the mask id."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers does not know model_type "llada"; that is expected
    try:
        tokenizer = without_custom_code(path)(str(path))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: no usable tokenizer ({err}); the checkpoint needs tokenizer.json") from err
    finally:
        hf_logging.set_verbosity(verbosity)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{path}: the tokenizer has neither a pad nor an eos token; set pad_token in tokenizer_config.json")
    if tokenizer.pad_token_id == mask_id:
        raise ValueError(
            f"{path}: the tokenizer's pad id {tokenizer.pad_token_id} equals the mask id {mask_id}; padding would read "
            "as masked positions. Set a different pad_token in tokenizer_config.json (LLaDA uses <|endoftext|>)."
        )
    return tokenizer


# Tokenizer classes that checkpoints ship as code, and the transformers tokenizer they are: Dream's
# DreamTokenizer is Qwen2's byte-level BPE (vocab.json + merges.txt) with Dream's special tokens.
CUSTOM_TOKENIZERS = {"DreamTokenizer": "qwen2"}


def without_custom_code(path: Path) -> Callable[[str], Any]:
    """How to load a checkpoint's tokenizer without running code from it: transformers' own class;
    for one declared as custom code (``auto_map``), a known class as the transformers tokenizer it
    is, else the generic fast tokenizer of its tokenizer.json."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config_file = Path(path) / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if "AutoTokenizer" not in (config.get("auto_map") or {}):
        return AutoTokenizer.from_pretrained
    name = config.get("tokenizer_class")
    if name in CUSTOM_TOKENIZERS:
        return partial(AutoTokenizer.from_pretrained, tokenizer_type=CUSTOM_TOKENIZERS[name])
    if (Path(path) / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained
    raise ValueError(
        f"{path}: the tokenizer is custom code ({name}, tokenizer_config.json auto_map) and lm_eval_dlmskip runs no "
        "code from a checkpoint; add the tokenizer's tokenizer.json, or give tokenizer=PATH of a compatible one"
    )


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides how text becomes ids: a fast tokenizer's whole definition (vocabulary,
    merges, normalizer, added tokens), else its vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def merge_lora(model: LLaDA, adapter: str, revision: str = "main") -> LLaDA:
    """Merge a PEFT LoRA adapter (upstream or our key names) into the weights, via peft."""
    from peft import PeftConfig, PeftModel

    path = resolve_adapter(adapter, revision)
    config = PeftConfig.from_pretrained(str(path))
    if config.peft_type != "LORA":
        raise ValueError(f"peft={adapter!r}: only LoRA adapters can be merged, this one is {config.peft_type}")
    peft_model = PeftModel(model, config)
    result = peft_model.load_adapter(
        str(path), adapter_name="default", key_mapping={r"^model\.transformer\.": "", r"^transformer\.": ""}
    )
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"peft={adapter!r} does not fit this model: missing {missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}"
        )
    return peft_model.merge_and_unload().fuse_projections()


def adapter_fingerprint(adapter: str, revision: str = "main") -> str:
    """sha256 of a LoRA adapter's weight files and its merge settings (adapter_config.json without
    the fields that only say where and with which peft it was saved)."""
    path = resolve_adapter(adapter, revision)
    config = json.loads((path / "adapter_config.json").read_text())
    for where in ("base_model_name_or_path", "revision", "peft_version", "inference_mode"):
        config.pop(where, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for file in sorted(path.glob("adapter_model.*")):
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def local_adapter(adapter: str) -> Path | None:
    """A LoRA adapter's local directory (checked to hold adapter_config.json), or None for a hub id."""
    path = local_directory(adapter, "peft")
    if path is not None and not (path / "adapter_config.json").exists():
        raise ValueError(f"peft={adapter!r}: adapter_config.json is missing; is this a LoRA adapter directory?")
    return path


def resolve_adapter(adapter: str, revision: str) -> Path:
    return local_adapter(adapter) or resolve_checkpoint(adapter, revision)
