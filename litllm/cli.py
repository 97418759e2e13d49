"""The command-line runner every task script uses: jsonargparse builds the options from the function's signature
(and its YAML config schema), and user mistakes end in one line with exit code 2."""
from __future__ import annotations

import inspect
import re
import sys

from jsonargparse import ArgumentParser

from litllm.errors import UserError


class OneLineErrorParser(ArgumentParser):
    """Argument mistakes end in one line naming the bad key and the valid ones, exit code 2."""

    def error(self, message: str, ex: Exception | None = None):
        message = " ".join(message.split())
        parser = self
        if match := re.search(r"Subcommand '([\w-]+)' does not accept", message):  # a key in a --config file
            parser = _subcommand_parser(self, match.group(1)) or self
        if "unrecognized arguments" in message or "does not accept" in message:
            valid = sorted(f"--{a.dest}" for a in parser._actions
                           if a.dest not in ("help", "config", "print_config") and a.option_strings)
            message += f" (valid options: {', '.join(valid)})"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def _subcommand_parser(parser: ArgumentParser, name: str) -> ArgumentParser | None:
    subcommands = parser._subcommands_action
    return subcommands._name_parser_map.get(name) if subcommands else None


def repeated_as_appends(components, args: list[str]) -> list[str]:
    """A list option of the command given more than once collects every value (`--reward a --reward b` is
    jsonargparse's `--reward+ a --reward+ b`); any other option given twice keeps the last value, as before."""
    function = components
    for arg in args:  # the subcommand's function, in a dict of them (nested as typed)
        if not isinstance(function, dict):
            break
        function = function.get(arg, function)
    if isinstance(function, dict):
        return args
    lists = {f"--{name}" for name, parameter in inspect.signature(function).parameters.items()
             if "list[" in str(parameter.annotation)}
    names = [arg.split("=", 1)[0] for arg in args if arg.startswith("--")]
    repeated = {name for name in names if names.count(name) > 1 and name in lists}
    return [arg.replace(name, f"{name}+", 1) if arg.startswith("--") and (name := arg.split("=", 1)[0]) in repeated
            else arg for arg in args]


def run(components, args: list[str] | None = None) -> None:
    """Run a CLI over `components`: a function (a copied script runs `run(setup)`), or a dict of them."""
    from jsonargparse import auto_cli

    try:
        auto_cli(components, args=repeated_as_appends(components, sys.argv[1:] if args is None else args), as_positional=True, parser_class=OneLineErrorParser)
    except UserError as e:
        # a mistake the user can fix: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
