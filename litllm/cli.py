"""The `litllm` command: one jsonargparse CLI over the task functions; their signatures are the options."""
from __future__ import annotations

import re
import sys

from jsonargparse import ArgumentParser

from litllm.errors import UserError


def commands() -> dict:
    from litllm import cp, download, evaluate, generate, serve, tokenizer_tools
    from litllm.convert import from_gguf, merge_lora, to_gguf
    from litllm.finetune import dpo, full, lora
    from litllm.pretrain import pretrain

    return {
        "download": download.download,
        "generate": generate.main,
        "chat": generate.chat,
        "pretrain": pretrain.setup,
        "evaluate": evaluate.main,
        "serve": serve.main,
        "finetune": {"_help": "Fine-tune a checkpoint: full, lora (QLoRA with --quantize), dpo (preference pairs).",
                     "full": full.setup, "lora": lora.setup, "dpo": dpo.setup},
        "convert": {"_help": "Convert checkpoints between formats: GGUF in and out, LoRA adapters merged.",
                    "from_gguf": from_gguf.from_gguf, "to_gguf": to_gguf.to_gguf,
                    "merge_lora": merge_lora.merge_lora},
        "cp": cp.cp,
        "tokenizer": {"_help": "Measure what a text costs in tokens; extend a tokenizer for a new language.",
                      "stats": tokenizer_tools.stats, "extend": tokenizer_tools.extend},
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
    args = sys.argv[1:] if args is None else args
    if args[:2] == ["cp", "--list"]:  # a listing, not a copy: no script and destination to ask for
        from litllm.cp import list_scripts

        return list_scripts()
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
