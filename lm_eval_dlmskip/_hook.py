"""Start-up hook (run by ``lm_eval_dlmskip.pth``): register ``llada_skip``, ``dream_skip`` and
``hf_skip`` when lm-eval loads, and judge their settings before lm-eval spends time.

lm-eval 0.4.13 finds ``--model`` names only in its own registry, so this puts a lazy entry
there the moment ``lm_eval.api.registry`` finishes importing. Nothing heavy is imported: until
lm-eval itself is imported this costs one finder on ``sys.meta_path``, and a model class (and
torch) loads only when lm-eval asks for its name. lm-eval's own model table is imported next
to ours, because its registry loads that table only while the registry is empty.

Two more modules are wrapped as they load, doing nothing for other models:
- ``lm_eval.evaluator.evaluate``: before it builds any request, a model of ours judges every
  task's generation settings (``dlmskip_check_tasks``; lm-eval's ``CachingLM`` passes the call
  through), so a task whose lengths cannot be honoured fails before the first request of any task.
- ``lm_eval._cli.run.Run._execute`` (the ``lm_eval`` command): our model_args are judged before
  lm-eval indexes its tasks (the same checks the model runs), and an error in a setting the user
  gave (``ArgumentError``) is printed alone, ``llada_skip: error: <message>``, with exit status 2.
"""

from __future__ import annotations

import functools
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


def model_class(name: str):
    """The class of one of our ``--model`` names (imports it, and torch)."""
    module, cls = MODELS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def check_tasks_first(evaluator) -> None:
    """Wrap ``evaluate(lm, task_dict, ...)``: the model judges the tasks before any request is built."""
    evaluate = evaluator.evaluate
    if getattr(evaluate, "_dlmskip", False):
        return

    @functools.wraps(evaluate)
    def evaluate_checked(*args, **kwargs):
        lm = kwargs.get("lm", args[0] if args else None)
        task_dict = kwargs.get("task_dict", args[1] if len(args) > 1 else None)
        check = getattr(lm, "dlmskip_check_tasks", None)
        if check is not None and task_dict is not None:
            check(task_dict)
        return evaluate(*args, **kwargs)

    evaluate_checked._dlmskip = True
    evaluator.evaluate = evaluate_checked


def print_argument_errors(cli_run) -> None:
    """Wrap the ``lm_eval`` command's run: our model_args judged first, our errors printed alone."""
    execute = cli_run.Run._execute
    if getattr(execute, "_dlmskip", False):
        return

    @functools.wraps(execute)
    def execute_checked(args):
        from lm_eval_dlmskip.common.errors import ArgumentError

        try:
            name = getattr(args, "model", None)
            if name in MODELS and getattr(args, "config", None) is None:  # a --config file may set model_args
                model_class(name).check_arguments(dict(getattr(args, "model_args", None) or {}))
            return execute(args)
        except ArgumentError as err:
            print(f"{err.model}: error: {err.message}", file=sys.stderr)
            raise SystemExit(2) from None

    execute_checked._dlmskip = True
    cli_run.Run._execute = staticmethod(execute_checked)


PATCHES = {REGISTRY: register, "lm_eval.evaluator": check_tasks_first, "lm_eval._cli.run": print_argument_errors}


class _PatchAfterLoad(importlib.abc.Loader):
    """Wraps a watched module's loader: execute it, then patch it."""

    def __init__(self, loader: importlib.abc.Loader, patch) -> None:
        self._loader = loader
        self._patch = patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._patch(module)

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


class _Watcher(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when a watched lm-eval module is about to load, wraps its loader once."""

    def __init__(self, names) -> None:
        self.pending = set(names)

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.pending:
            return None
        self.pending.discard(fullname)
        if not self.pending:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = getattr(finder, "find_spec", lambda *a: None)(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _PatchAfterLoad(spec.loader, PATCHES[fullname])
                return spec
        return None


def install() -> None:
    if any(isinstance(f, _Watcher) for f in sys.meta_path):
        return
    for name in [n for n in PATCHES if n in sys.modules]:  # lm-eval already loaded (this hook imported late)
        PATCHES[name](sys.modules[name])
    waiting = [n for n in PATCHES if n not in sys.modules]
    if waiting:
        sys.meta_path.insert(0, _Watcher(waiting))


install()
