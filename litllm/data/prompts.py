"""Prompts for online RL (GRPO): the model writes the completions itself, and reward functions score them.

A row is `{"prompt": ..., <any other columns>}` (the prompt key configurable): the prompt a string or a list of chat
messages. The other columns (e.g. `answer`) are kept as they are and handed to the reward functions with the
completions. Each prompt is rendered and tokenized once, ending where the model's answer starts: with the checkpoint's
chat template (a string is one user message) and its generation prompt, or the Alpaca prompt, or as raw text.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from litllm.data.jsonl import read_rows
from litllm.data.sft import alpaca_prompt, check_messages, split_indices
from litllm.errors import UserError
from litllm.tokenizer import Tokenizer


@dataclass
class Prompts:
    """Prompts from a JSON or JSON Lines file, tokenized up front by `setup`.

    Attributes:
        json_path: the data file: a JSON list of objects, or JSON Lines (one object per line).
        prompt_style: how a prompt becomes text. "chat_template": the checkpoint's chat template with its generation
            prompt (a string prompt is one user message). "alpaca": the Alpaca prompt around a string prompt. "raw":
            a string prompt as it is (base models). "auto": chat_template when the checkpoint has one, else alpaca.
        prompt_key: the key of the prompt; every other key of a row goes to the reward functions.
        val_split_fraction: the fraction of prompts held out for validation (at least one when above 0).
        seed: the seed of the train/validation split.
    """

    json_path: Path | None = None
    prompt_style: Literal["auto", "chat_template", "alpaca", "raw"] = "auto"
    prompt_key: str = "prompt"
    val_split_fraction: float = 0.0
    seed: int = 42

    def setup(self, tokenizer: Tokenizer, max_seq_length: int) -> tuple[PromptDataset, PromptDataset]:
        """Read, validate and tokenize every prompt; split into (train, validation) datasets.

        `max_seq_length` is the longest prompt kept (GRPO passes what leaves room for a whole completion): a longer
        one is left out, not cut (a prompt cut short asks another question); afterwards `num_prompts` and
        `num_dropped` say how many were.
        """
        if not 0 <= self.val_split_fraction < 1:
            raise UserError(f"--data.val_split_fraction must be in [0, 1), got {self.val_split_fraction}")
        style = self._style(tokenizer)
        if self.json_path is None:
            raise UserError("--data Prompts needs --data.json_path FILE")
        path = Path(self.json_path)
        rows = list(read_rows(path))
        if not rows:
            raise UserError(f"{path}: no rows")
        examples: list[dict[str, Any] | None] = []
        self.num_prompts, self.num_dropped = len(rows), 0
        for line, row in tqdm(rows, desc=f"Tokenizing {path.name}", unit=" prompts", disable=len(rows) < 300):
            try:
                prompt_ids = self.encode(tokenizer, style, row)
            except UserError as error:  # a bad row, or the chat template failed on it
                raise UserError(f"{path}:{line}: {error}") from None
            if len(prompt_ids) > max_seq_length:
                self.num_dropped += 1
                examples.append(None)
                continue
            examples.append({"prompt_ids": prompt_ids, "prompt": row[self.prompt_key],
                             "columns": {key: value for key, value in row.items() if key != self.prompt_key}})
        train_rows, val_rows = split_indices(len(rows), self.val_split_fraction, self.seed)
        train = PromptDataset([examples[i] for i in train_rows if examples[i] is not None])
        val = PromptDataset([examples[i] for i in val_rows if examples[i] is not None])
        self._summary = (f"{len(train)} training and {len(val)} validation prompts"
                         + (f"; {self.num_dropped} of {self.num_prompts} left out: longer than {max_seq_length} tokens"
                            if self.num_dropped else ""))
        return train, val

    def summary(self) -> str:
        return self._summary

    def sources(self) -> list[Path]:
        return [Path(self.json_path)] if self.json_path is not None else []

    def _style(self, tokenizer: Tokenizer) -> str:
        styles = ("auto", "chat_template", "alpaca", "raw")
        if self.prompt_style not in styles:
            raise UserError(f"--data.prompt_style must be one of {', '.join(styles)}; got {self.prompt_style!r}")
        if self.prompt_style == "chat_template" and tokenizer.chat_template is None:
            raise UserError(f"{tokenizer.checkpoint_dir} has no chat template; use --data.prompt_style alpaca or "
                            "raw with this checkpoint")
        if self.prompt_style != "auto":
            return self.prompt_style
        return "chat_template" if tokenizer.chat_template is not None else "alpaca"

    def encode(self, tokenizer: Tokenizer, style: str, row: Any) -> list[int]:
        """A row's prompt as token ids in `style`; a bad row raises a UserError naming the key."""
        if not isinstance(row, dict):
            raise UserError(f"expected an object, got {type(row).__name__}")
        if self.prompt_key not in row:
            raise UserError(f"missing key '{self.prompt_key}' (keys: {', '.join(row)}); pick another with "
                            "--data.prompt_key")
        prompt = row[self.prompt_key]
        if isinstance(prompt, list):
            if style != "chat_template":
                raise UserError(f"'{self.prompt_key}' is a list of messages, which needs --data.prompt_style "
                                "chat_template (and a checkpoint with a chat template)")
            messages = check_messages(prompt, self.prompt_key)
            if messages[-1]["role"] == "assistant":
                raise UserError(f"'{self.prompt_key}' ends with an assistant message; the prompt is what comes "
                                "before the model's answer")
            return tokenizer.encode_chat(messages)
        if not isinstance(prompt, str):
            raise UserError(f"'{self.prompt_key}' must be a string or a list of messages, got "
                            f"{type(prompt).__name__}")
        if not prompt.strip():
            raise UserError(f"'{self.prompt_key}' is empty")
        if style == "chat_template":
            return tokenizer.encode_chat([{"role": "user", "content": prompt}])
        return tokenizer.encode(alpaca_prompt(prompt) if style == "alpaca" else prompt)


class PromptDataset:
    """Tokenized prompts in memory: each {"prompt_ids": list of ints, "prompt": the row's prompt as written,
    "columns": the row's other keys}. The script batches them itself (rollouts decide the completions)."""

    def __init__(self, examples: list[dict[str, Any]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]
