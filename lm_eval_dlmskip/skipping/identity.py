"""Which model a skip profile or router checkpoint was made on, and the check that it fits the
model evaluated: family and shapes always; the weights (a fingerprint, adapters included), every
field of the model's config and the tokenizer unless allowed. A checkpoint with the same weights
but another rope_theta or mask id, or read through another tokenizer, is another model."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from ..common.families import FAMILIES


def with_adapter(fingerprint: str, adapter: str) -> str:
    """The identity of weights with a LoRA adapter merged: ``base+adapter`` (readable, and equal
    only for the same base and the same adapter)."""
    return f"{fingerprint}+{adapter}"


def model_identity(cfg: Any, name: str, fingerprint: str, tokenizer: str | None = None) -> dict:
    """What router checkpoints and skip profiles record about the model they were made on: its
    shapes, weight fingerprint, every config field and the tokenizer's fingerprint
    (``tokenizer_fingerprint``)."""
    return {
        "name": name,
        "family": cfg.family,
        "fingerprint": fingerprint,
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "mlp_hidden_size": cfg.mlp_hidden_size,
        "vocab_size": cfg.vocab_size,
        "config": asdict(cfg),
        "tokenizer": tokenizer,
    }


def check_identity(
    base: dict, cfg: Any, fingerprint: str, allow_mismatch: bool, subject: str, tokenizer: str | None = None
) -> None:
    """Refuse an artifact made on another model: another family or shape always; other weights,
    config fields or tokenizer unless allowed. ``subject`` begins the message, e.g. "router='x'
    was trained for"; ``fingerprint`` is that of the weights evaluated, adapters merged (see
    ``with_adapter``), ``tokenizer`` that of the tokenizer in use. What an artifact did not record
    (written before config and tokenizer were) is not compared."""
    family = base.get("family", "llada")  # artifacts written before Dream existed were made on LLaDA
    kind = FAMILIES.get(family, family) + (f" ({base['model_type']})" if base.get("model_type") else "")
    made_on = (f"{base['name']} ({kind}, n_layers={base['n_layers']}, d_model={base['d_model']}, "
               f"fingerprint {base['fingerprint']})")
    if family != cfg.family:
        this = FAMILIES.get(cfg.family, cfg.family)
        raise ValueError(f"{subject} {made_on}: made for {kind}, while this model is {this}; use one made for "
                         f"{this} (dlmskip calibrate or train on the model you evaluate)")
    if (base["n_layers"], base["d_model"]) != (cfg.n_layers, cfg.d_model):
        raise ValueError(f"{subject} {made_on}; this model has n_layers={cfg.n_layers}, d_model={cfg.d_model}")
    differences = _differences(base, cfg, fingerprint, tokenizer)
    if differences and not allow_mismatch:
        raise ValueError(
            f"{subject} {made_on}; {'; '.join(differences)}. "
            "Use the model it was made for, or pass allow_mismatch=True to use it anyway."
        )


def _differences(base: dict, cfg: Any, fingerprint: str, tokenizer: str | None) -> list[str]:
    """How the model evaluated differs from the one an artifact recorded, one phrase each."""
    differences = []
    if base["fingerprint"] != fingerprint:
        checkpoint, *adapters = fingerprint.split("+")
        merged = f" (base {checkpoint}{''.join(f' + peft adapter {a}' for a in adapters)})" if adapters else ""
        differences.append(f"the weights evaluated{merged} have fingerprint {fingerprint}")
    recorded = base.get("config") or {}
    current = json.loads(json.dumps(asdict(cfg))) if recorded else {}  # as recorded: tuples become lists
    fields = [f"{k} ({recorded[k]!r} there, {current[k]!r} here)" for k in recorded if k in current and recorded[k] != current[k]]
    if fields:
        differences.append(f"the config of the model evaluated differs in {', '.join(fields)}")
    if base.get("tokenizer") is not None and tokenizer is not None and base["tokenizer"] != tokenizer:
        differences.append(f"it was made with tokenizer {base['tokenizer']}, the tokenizer in use is {tokenizer}")
    return differences
