"""Which model a skip profile or router checkpoint was made on, and the check that it fits the
model evaluated: shapes always, weights (a fingerprint, adapters included) unless allowed."""

from __future__ import annotations

from typing import Any

from ..common.families import FAMILIES


def with_adapter(fingerprint: str, adapter: str) -> str:
    """The identity of weights with a LoRA adapter merged: ``base+adapter`` (readable, and equal
    only for the same base and the same adapter)."""
    return f"{fingerprint}+{adapter}"


def model_identity(cfg: Any, name: str, fingerprint: str) -> dict:
    """What router checkpoints and skip profiles record about the model they were made on."""
    return {
        "name": name,
        "family": cfg.family,
        "fingerprint": fingerprint,
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "mlp_hidden_size": cfg.mlp_hidden_size,
        "vocab_size": cfg.vocab_size,
    }


def check_identity(base: dict, cfg: Any, fingerprint: str, allow_mismatch: bool, subject: str) -> None:
    """Refuse an artifact made on another model: other shapes always, other weights unless allowed.
    ``subject`` begins the message, e.g. "router='x' was trained for"; ``fingerprint`` is that of
    the weights evaluated, adapters merged (see ``with_adapter``)."""
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
    if base["fingerprint"] != fingerprint and not allow_mismatch:
        checkpoint, *adapters = fingerprint.split("+")
        merged = f" (base {checkpoint}{''.join(f' + peft adapter {a}' for a in adapters)})" if adapters else ""
        raise ValueError(
            f"{subject} {made_on}; the weights evaluated{merged} have fingerprint {fingerprint}. "
            "Use the model it was made for, or pass allow_mismatch=True to use it anyway."
        )
