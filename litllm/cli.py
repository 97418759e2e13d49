"""The `litllm` command: one jsonargparse CLI over the task functions; their signatures are the options."""
from __future__ import annotations

import re
import sys

from jsonargparse import ArgumentParser

from litllm.errors import UserError


def commands() -> dict:
    from litllm import convert, download, generate
    from litllm.finetune import full, lora

    return {
        "download": download.download,
        "generate": generate.main,
        "chat": generate.chat,
        "finetune": {"_help": "Fine-tune a checkpoint: full, lora (QLoRA with --quantize).",
                     "full": full.setup, "lora": lora.setup},
        "convert": {"_help": "Convert checkpoints between formats: GGUF in and out, LoRA adapters merged.",
                    "from_gguf": convert.from_gguf, "to_gguf": convert.to_gguf, "merge_lora": convert.merge_lora},
    }


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


def main(args: list[str] | None = None) -> None:
    run(commands(), args)


def run(components, args: list[str] | None = None) -> None:
    """Run a CLI over `components` (a function, or a dict of them); used by `litllm` and by copied scripts."""
    from jsonargparse import auto_cli

    try:
        auto_cli(components, args=args, as_positional=True, parser_class=OneLineErrorParser)
    except UserError as e:
        # a mistake the user can fix: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
