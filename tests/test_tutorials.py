"""Docs never rot: every `litllm` command in the README and the tutorials parses with its arguments.

Each command is run through the real CLI with `--print_config` appended, which parses every option (config
files included) and stops before doing any work; a typo'd option or a renamed flag fails here.
"""
import re
import shlex
from pathlib import Path

import pytest

from litllm.commands import main

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "tutorials").glob("*.md"))]
# $(...) command substitutions (one level of nested parentheses) stand for a path here
SUBSTITUTION = re.compile(r"\$\((?:[^()]|\([^()]*\))*\)")


def shell_commands(markdown: str) -> list[list[str]]:
    """The simple commands in the ```bash blocks of a markdown text, as argv lists, with `NAME=value`
    variables set earlier in the document expanded."""
    commands, variables = [], {}
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.DOTALL):
        for line in logical_lines(SUBSTITUTION.sub("/substituted/path", block.replace("\\\n", " "))):
            if assignment := re.fullmatch(r"\s*(?:export\s+)?(\w+)=(\S*)\s*", line):
                variables[assignment[1]] = assignment[2].strip("\"'")
                continue
            line = re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m[1], m[0]), line)
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            lexer.commenters = "#"
            words: list[str] = []
            tokens = iter(list(lexer) + [";"])
            for token in tokens:
                if token in (">", ">>", "<"):  # a redirection and its file are not arguments
                    next(tokens)
                elif set(token) <= set("&|;(){}"):
                    if words:
                        commands.append(words)
                    words = []
                else:
                    words.append(token)
    return commands


def logical_lines(script: str) -> list[str]:
    """Split at newlines outside quotes (a quoted JSON body may span lines)."""
    lines, current, quote = [], "", None
    for char in script:
        if char == "\n" and quote is None:
            lines.append(current)
            current = ""
            continue
        if char in "'\"" and quote in (None, char):
            quote = None if quote else char
        current += char
    return lines + [current]


def litllm_commands() -> list[tuple[str, list[str]]]:
    found = []
    for doc in DOCS:
        for words in shell_commands(doc.read_text()):
            while words and re.fullmatch(r"\w+=.*", words[0]):  # VAR=value litllm ...
                words = words[1:]
            if words and words[0] == "litllm":
                found.append((f"{doc.name}: {shlex.join(words)}", words[1:]))
    return found


COMMANDS = litllm_commands()


def test_the_docs_have_commands_of_every_task():
    tasks = {args[0] for _, args in COMMANDS if args}
    assert {"download", "generate", "chat", "finetune", "pretrain", "evaluate", "serve", "convert", "cp"} <= tasks


@pytest.mark.parametrize("where, args", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_command_parses(where, args, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # commands name config_hub/ and data/ files relative to the repository
    extra = [] if "--help" in args or args == ["cp", "--list"] else ["--print_config"]
    try:
        main(args + extra)
    except SystemExit as exit:
        assert exit.code in (0, None), f"{where}\n{capsys.readouterr().err}"
