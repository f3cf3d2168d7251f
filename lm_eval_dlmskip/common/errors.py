"""The error of a setting the user gave (a model_arg, a task's generation settings) that cannot be
honoured. Under the ``lm_eval`` command line the start-up hook prints it alone, as
``llada_skip: error: <message>`` with exit status 2, instead of lm-eval's traceback; Python callers
catch it as the ``ValueError`` it is."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


class ArgumentError(ValueError):
    """A user setting ``model`` (the ``--model`` name) cannot honour; ``message`` names the fix."""

    def __init__(self, model: str, message: str) -> None:
        self.model = model
        self.message = message.removeprefix(f"{model}: ")
        super().__init__(f"{model}: {self.message}")


@contextmanager
def argument_errors(model: str) -> Iterator[None]:
    """Inside, a ValueError is the user's settings' fault (the checks raise ValueErrors naming the
    setting and the fix): it leaves as an ``ArgumentError`` of ``model``, the original chained."""
    try:
        yield
    except ArgumentError:
        raise
    except ValueError as err:
        raise ArgumentError(model, str(err)) from err
