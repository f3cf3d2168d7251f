"""Start-up hook (run by ``lm_eval_dlmskip.pth``): register ``llada_skip``, ``dream_skip`` and
``hf_skip`` when lm-eval loads.

lm-eval 0.4.13 finds ``--model`` names only in its own registry, so this puts a lazy entry
there the moment ``lm_eval.api.registry`` finishes importing. Nothing heavy is imported: until
lm-eval itself is imported this costs one finder on ``sys.meta_path``, and a model class (and
torch) loads only when lm-eval asks for its name. lm-eval's own model table is imported next
to ours, because its registry loads that table only while the registry is empty.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys

REGISTRY = "lm_eval.api.registry"
MODELS = {  # --model name -> class, as pyproject's lm_eval.models entry points
    "llada_skip": "lm_eval_dlmskip.harness.llada:LLaDASkipLM",
    "hf_skip": "lm_eval_dlmskip.harness.hf:HFSkipLM",
    "dream_skip": "lm_eval_dlmskip.harness.dream:DreamSkipLM",
    "llada2_skip": "lm_eval_dlmskip.harness.llada2:LLaDA2SkipLM",
}


def register(registry_module) -> None:
    """Add the lazy entries of our models and keep lm-eval's built-in models (hf, vllm, ...) listed."""
    registry = registry_module.model_registry
    for name, target in MODELS.items():
        if name not in registry:
            registry.register(name, target=target)
    importlib.import_module("lm_eval.models")


class _RegisterAfterLoad(importlib.abc.Loader):
    """Wraps the registry module's loader: execute it, then register."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        register(module)

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


class _RegistryWatcher(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when lm-eval's registry is about to load, wraps its loader once."""

    def find_spec(self, fullname, path, target=None):
        if fullname != REGISTRY:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            spec = getattr(finder, "find_spec", lambda *a: None)(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisterAfterLoad(spec.loader)
                return spec
        return None


def install() -> None:
    if REGISTRY in sys.modules:  # lm-eval already loaded (e.g. this hook imported late)
        register(sys.modules[REGISTRY])
    elif not any(isinstance(f, _RegistryWatcher) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegistryWatcher())


install()
