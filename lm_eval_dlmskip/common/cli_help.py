"""How every ``dlmskip`` subcommand prints its ``--help``."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, also where the option has no help text; not None, a flag's
    True/False, or one the help already names."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and self._shown_default(action):
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return super()._get_help_string(action) if self._shown_default(action) else action.help

    @staticmethod
    def _shown_default(action: argparse.Action) -> bool:
        default = action.default
        return (action.option_strings != [] and default is not None and not isinstance(default, bool)
                and default is not argparse.SUPPRESS and "default" not in (action.help or ""))
