"""Skip profiles: the JSON file ``dlmskip calibrate`` writes and ``skip_profile=PATH`` reads.

A profile holds the blocks chosen (0-based, in the order chosen), the whole similarity profile it
was chosen from, and the identity of the model it was measured on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .identity import check_identity

FORMAT_VERSION = 1
KIND = "lm_eval_dlmskip.skip_profile"
NUMBERING = (
    "skip_layers and selection_order are 0-based block indices; the papers number blocks 1..N "
    "(paper_layers = skip_layers + 1)"
)


def read_profile(path: str | Path) -> dict:
    """A skip profile file, checked to be one (not yet against a model)."""
    path = Path(path)
    try:
        profile = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"skip_profile={str(path)!r}: no such file; make one with dlmskip calibrate") from None
    except IsADirectoryError:
        raise ValueError(f"skip_profile={str(path)!r} is a directory; give the JSON file dlmskip calibrate wrote") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"skip_profile={str(path)!r}: not valid JSON ({err})") from err
    if not isinstance(profile, dict) or profile.get("kind") != KIND or profile.get("format") != FORMAT_VERSION:
        raise ValueError(f"skip_profile={str(path)!r}: not a skip profile of format {FORMAT_VERSION}")
    return profile


def profile_blocks(profile: dict, path: str | Path, k: int | None) -> list[int]:
    """The blocks (sorted) a profile selects: all its choices, or its first ``k``."""
    order = profile["selection_order"]
    if k is not None:
        if not 0 <= k <= len(order):
            raise ValueError(f"skip_k={k}: the profile {str(path)!r} chose {len(order)} blocks; give 0..{len(order)}")
        order = order[:k]
    return sorted(order)


def load_profile(
    path: str | Path, cfg: Any, fingerprint: str, allow_mismatch: bool, k: int | None, tokenizer: str | None = None
) -> tuple[list[int], dict]:
    """The blocks a skip profile selects (its first ``k`` choices when given), checked against the
    model (``cfg``, weights ``fingerprint``, ``tokenizer`` fingerprint: see identity.py)."""
    profile = read_profile(path)
    check_identity(profile["base_model"], cfg, fingerprint, allow_mismatch, f"skip_profile={str(path)!r} was measured on",
                   tokenizer)
    return profile_blocks(profile, path, k), profile
