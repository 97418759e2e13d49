"""The command-line runner every task script uses: jsonargparse builds the options from the function's signature
(and its YAML config schema), and user mistakes end in one line with exit code 2."""
from __future__ import annotations

import re
import sys

from jsonargparse import ArgumentParser

from litllm.errors import UserError


class OneLineErrorParser(ArgumentParser):
    """Argument mistakes end in one line naming the bad key and the valid ones, exit code 2."""

    def error(self, message: str, ex: Exception | None = None):
        message = " ".join(message.split())
        if repeated := re.search(r"unrecognized arguments: --([\w.]+)\+", message):  # see repeated_as_appends
            print(f"error: --{repeated.group(1)} is given more than once, but it takes one value", file=sys.stderr)
            sys.exit(2)
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


def repeated_as_appends(args: list[str]) -> list[str]:
    """An option given more than once adds each value to its list (`--reward a --reward b`, jsonargparse's
    `--reward+ a --reward+ b`); an option that takes one value then fails to parse, and says so."""
    names = [arg.split("=", 1)[0] for arg in args if arg.startswith("--")]
    repeated = {name for name in names if names.count(name) > 1 and name not in ("--config", "--print_config")}
    return [arg.replace(name, f"{name}+", 1) if arg.startswith("--") and (name := arg.split("=", 1)[0]) in repeated
            else arg for arg in args]


def run(components, args: list[str] | None = None) -> None:
    """Run a CLI over `components`: a function (a copied script runs `run(setup)`), or a dict of them."""
    from jsonargparse import auto_cli

    try:
        auto_cli(components, args=repeated_as_appends(sys.argv[1:] if args is None else args), as_positional=True, parser_class=OneLineErrorParser)
    except UserError as e:
        # a mistake the user can fix: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
