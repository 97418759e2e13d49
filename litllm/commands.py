"""The `litllm` command: which task function each subcommand runs.

Only the named command's module is imported (by its name below), so `litllm generate` never loads the training
stack, lm-eval or the web server, and `litllm --help` reads the summaries from the source without importing.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from pathlib import Path

from litllm.cli import run

# subcommand -> "module:function", or a group of them with its one-line help under "_help"
COMMANDS: dict = {
    "download": "litllm.download:download",
    "generate": "litllm.generate:main",
    "chat": "litllm.generate:chat",
    "pretrain": "litllm.pretrain.pretrain:setup",
    "evaluate": "litllm.evaluate:main",
    "serve": "litllm.serve:main",
    "finetune": {"_help": "Fine-tune a checkpoint: full, lora (QLoRA with --quantize), dpo (preference pairs), "
                          "kto (completions labelled good or bad), reward (a reward model from preference pairs), "
                          "grpo (online RL: the model's own answers, scored by rewards).",
                 "full": "litllm.finetune.full:setup", "lora": "litllm.finetune.lora:setup",
                 "dpo": "litllm.finetune.dpo:setup", "kto": "litllm.finetune.kto:setup",
                 "reward": "litllm.finetune.reward:setup", "grpo": "litllm.finetune.grpo:setup"},
    "convert": {"_help": "Convert checkpoints between formats: GGUF in and out, LoRA adapters merged.",
                "from_gguf": "litllm.convert.from_gguf:from_gguf", "to_gguf": "litllm.convert.to_gguf:to_gguf",
                "merge_lora": "litllm.convert.merge_lora:merge_lora"},
    "cp": "litllm.cp:cp",
    "tokenizer": {"_help": "Measure what a text costs in tokens; extend a tokenizer for a new language.",
                  "stats": "litllm.tokenizer_tools:stats", "extend": "litllm.tokenizer_tools:extend"},
}


def main(args: list[str] | None = None) -> None:
    args = sys.argv[1:] if args is None else list(args)
    if args[:2] == ["cp", "--list"]:  # a listing, not a copy: no script and destination to ask for
        from litllm.cp import list_scripts

        return list_scripts()
    path, command = [], COMMANDS
    while isinstance(command, dict) and len(args) > len(path) and args[len(path)] in command:
        path.append(args[len(path)])
        command = command[path[-1]]
    if isinstance(command, dict):  # no command named (yet): list what there is at this level
        rest = args[len(path):]
        if rest[:1] in (["-h"], ["--help"]):
            return overview(path, command)
        named = f"unknown command '{rest[0]}'" if rest else "name a command"
        print(f"error: {named}; choose one of {', '.join(choices(command))}", file=sys.stderr)
        sys.exit(2)
    components = load(command)
    for name in reversed(path):  # nested as typed, so usage lines and config files keep their shape
        components = {name: components}
    run(components, args)


def choices(group: dict) -> list[str]:
    return [name for name in group if name != "_help"]


def load(command: str):
    module, function = command.split(":")
    return getattr(importlib.import_module(module), function)


def overview(path: list[str], group: dict) -> None:
    prefix = " ".join(["litllm", *path])
    lines = [f"usage: {prefix} {{{','.join(choices(group))}}} ...", "",
             f"Commands (`{prefix} COMMAND --help` shows a command's options):"]
    for name in choices(group):
        lines.append(f"  {name:<11} {summary(group[name])}")
    print("\n".join(lines))


def summary(command: str | dict) -> str:
    """A command's one-line help: a group's "_help", else the first line of the function's docstring, read from the
    source without importing the module."""
    if isinstance(command, dict):
        return command["_help"]
    module, function = command.split(":")
    source = Path(importlib.util.find_spec(module).origin).read_text(encoding="utf-8")
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name == function:
            return (ast.get_docstring(node) or "").splitlines()[0]
    raise LookupError(f"{command}: no such function")
