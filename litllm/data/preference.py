"""Preference pairs for DPO: a prompt, the response people chose and the one they rejected.

A row comes in one of these forms (keys configurable):

- `{"prompt": ..., "chosen": ..., "rejected": ...}`: the prompt a string or a list of chat messages, each response
  a string or a list of messages ending with the assistant's answer.
- hh-rlhf: `{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}`, two whole transcripts that share
  everything up to their last "\\n\\nAssistant:" (the prompt) and differ in what follows (the responses).
- `{"chosen": [messages], "rejected": [messages]}`: two conversations that differ only in the last, assistant message.

A prompt string that is itself a "\\n\\nHuman: ...\\n\\nAssistant:" transcript (hh-rlhf split into prompt, chosen and
rejected) is read as the conversation it holds, so both hh-rlhf layouts give the same pairs.

Each pair becomes two sequences, prompt + chosen and prompt + rejected, rendered the way SFT renders a row (the
checkpoint's chat template by default), tokenized as a whole, with labels -100 everywhere but the final response:
a DPO log-probability is the sum over the response tokens only.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from litllm.data.jsonl import read_rows
from litllm.data.sft import (IGNORE_INDEX, Rendered, alpaca_prompt, check_messages, collate, render_chat,
                             split_indices, tokenize)
from litllm.errors import UserError
from litllm.tokenizer import Tokenizer

ASSISTANT_MARKER = "\n\nAssistant:"
_TRANSCRIPT_TURN = re.compile(r"\n\n(Human|Assistant):")
_TRANSCRIPT_SPEAKERS = {"Human": "user", "Assistant": "assistant"}


class PromptedResponses:
    """What preference pairs and unpaired (KTO) examples share: reading a prompt (a string, an hh-rlhf transcript or
    chat messages) and a response (a string or messages), or a whole dialogue ending with the response, from a row,
    and rendering them in the chosen prompt style. Subclasses are dataclasses with the options `prompt_style` and
    `prompt_key`."""

    def _check_style(self, tokenizer: Tokenizer) -> None:
        styles = ("auto", "chat_template", "alpaca", "transcript")
        if self.prompt_style not in styles:
            raise UserError(f"--data.prompt_style must be one of {', '.join(styles)}; got {self.prompt_style!r}")
        if self.prompt_style == "chat_template" and tokenizer.chat_template is None:
            raise UserError(f"{tokenizer.checkpoint_dir} has no chat template; use --data.prompt_style alpaca or "
                            "transcript with this checkpoint")
        self.style = self.prompt_style
        if self.style == "auto":
            self.style = "chat_template" if tokenizer.chat_template is not None else "alpaca"
        if self.style != "chat_template" and tokenizer.eos_id is None:
            raise UserError(f"{tokenizer.checkpoint_dir} has no eos_token to end {self.style} responses with")

    def messages(self, row: dict[str, Any], key: str) -> list[dict[str, str]]:
        """The prompt and the response under `key` as one conversation (the caller checks that it ends with the
        assistant's response); a bad prompt or response raises a UserError naming its key."""
        if self.prompt_key not in row:
            return self._dialogue(row, key)
        prompt = row[self.prompt_key]
        if isinstance(prompt, str) and is_transcript(prompt):
            prompt = parse_transcript(prompt)
            if prompt[-1] == {"role": "assistant", "content": ""}:  # the "Assistant:" the response follows
                prompt.pop()
        elif isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list):
            prompt = check_messages(prompt, self.prompt_key)
        else:
            raise UserError(f"'{self.prompt_key}' must be a string or a list of messages, got {type(prompt).__name__}")
        # the response after a transcript's "Assistant:" starts with a space that belongs to the format
        strip = isinstance(row[self.prompt_key], str) and is_transcript(row[self.prompt_key])
        return prompt + self._response(row, key, strip)

    def _response(self, row: dict[str, Any], key: str, strip: bool) -> list[dict[str, str]]:
        value = row[key]
        if isinstance(value, str):
            return [{"role": "assistant", "content": value.strip() if strip else value}]
        if isinstance(value, list):
            return check_messages(value, key)
        raise UserError(f"'{key}' must be a string or a list of messages, got {type(value).__name__}")

    def _dialogue(self, row: dict[str, Any], key: str) -> list[dict[str, str]]:
        value = row[key]
        if isinstance(value, list):
            return check_messages(value, key)
        if isinstance(value, str):
            if not is_transcript(value) or ASSISTANT_MARKER not in value:
                raise UserError(f"'{key}' is a string but no '\\n\\nHuman: ...\\n\\nAssistant: ...' transcript; "
                                f"rows with a single response need a '{self.prompt_key}' "
                                "(or pick its key with --data.prompt_key)")
            return parse_transcript(value)
        raise UserError(f"'{key}' must be a transcript string or a list of messages, got {type(value).__name__}")

    def render(self, tokenizer: Tokenizer, prompt: list[dict[str, str]], response: str) -> Rendered:
        """The prompt and one response as text, with the span of the response (its end-of-turn marker included)."""
        if self.style == "chat_template":
            rendered = render_chat(tokenizer, [*prompt, {"role": "assistant", "content": response}])
            return Rendered(rendered.text, rendered.response_spans[-1:], rendered.add_special_tokens,
                            rendered.append_eos)
        if self.style == "alpaca":
            if len(prompt) != 1 or prompt[0]["role"] != "user":
                raise UserError("--data.prompt_style alpaca takes a single user message as the prompt; this one has "
                                f"{len(prompt)} messages ({', '.join(m['role'] for m in prompt)}); use "
                                "--data.prompt_style transcript, or a checkpoint with a chat template")
            text = alpaca_prompt(prompt[0]["content"])
            return Rendered(text + response, [(len(text), len(text) + len(response))], add_special_tokens=True,
                            append_eos=True)
        text = transcript(prompt)
        return Rendered(f"{text} {response}", [(len(text), len(text) + 1 + len(response))], add_special_tokens=True,
                        append_eos=True)


@dataclass
class Preference(PromptedResponses):
    """Preference pairs from a JSON or JSON Lines file, tokenized up front by `setup`.

    Attributes:
        json_path: the data file: a JSON list of objects, or JSON Lines (one object per line).
        prompt_style: how a conversation becomes text. "chat_template": the checkpoint's chat template.
            "alpaca": the Alpaca prompt around a single-turn prompt, then the response and EOS. "transcript": the
            hh-rlhf text "\\n\\nHuman: ...\\n\\nAssistant: ...", then EOS (for base models trained on that format).
            "auto": chat_template when the checkpoint has one, else alpaca (as SFT does, so a model fine-tuned with
            `litllm finetune` gets preference-tuned in the format it learned).
        prompt_key: the key of the prompt; rows without it hold two whole conversations (hh-rlhf).
        chosen_key: the key of the preferred response (or conversation).
        rejected_key: the key of the dispreferred response (or conversation).
        margin_key: the key of an optional number per pair: how much better the chosen response is, which a reward
            model's loss asks of its scores (`litllm finetune reward`; 0 where a row has none; DPO ignores it).
        val_split_fraction: the fraction of pairs held out for validation (at least one pair when above 0).
        seed: the seed of the train/validation split.
    """

    json_path: Path | None = None
    prompt_style: Literal["auto", "chat_template", "alpaca", "transcript"] = "auto"
    prompt_key: str = "prompt"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    margin_key: str = "margin"
    val_split_fraction: float = 0.05
    seed: int = 42

    def setup(self, tokenizer: Tokenizer, max_seq_length: int) -> tuple[PreferenceDataset, PreferenceDataset]:
        """Read, validate and tokenize every pair; split into (train, validation) datasets.

        A sequence longer than `max_seq_length` loses prompt tokens from the left and response tokens from the right
        (see `truncate_sequences`); afterwards `num_examples`, `num_truncated` and `num_dropped` (pairs left with no
        response token, and left out) say how many pairs were.
        """
        if not 0 <= self.val_split_fraction < 1:
            raise UserError(f"--data.val_split_fraction must be in [0, 1), got {self.val_split_fraction}")
        self._check_style(tokenizer)
        if self.json_path is None:
            raise UserError("--data Preference needs --data.json_path FILE")
        path = Path(self.json_path)
        rows = list(read_rows(path))
        if not rows:
            raise UserError(f"{path}: no rows")
        pairs: list[dict[str, torch.Tensor] | None] = []
        self.num_examples, self.num_truncated, self.num_dropped = len(rows), 0, 0
        for line, row in tqdm(rows, desc=f"Tokenizing {path.name}", unit=" pairs", disable=len(rows) < 300):
            try:
                prompt, chosen, rejected = self.conversation(row)
                margin = self.margin(row)
                chosen_ids, chosen_labels = tokenize(tokenizer, self.render(tokenizer, prompt, chosen), True)
                rejected_ids, rejected_labels = tokenize(tokenizer, self.render(tokenizer, prompt, rejected), True)
            except UserError as error:  # a bad row, or the chat template failed on it
                raise UserError(f"{path}:{line}: {error}") from None
            [(chosen_ids, chosen_labels), (rejected_ids, rejected_labels)], truncated = truncate_sequences(
                [(chosen_ids, chosen_labels), (rejected_ids, rejected_labels)], max_seq_length)
            self.num_truncated += truncated
            if not has_target(chosen_labels) or not has_target(rejected_labels):
                self.num_dropped += 1
                pairs.append(None)
                continue
            pairs.append({"chosen_input_ids": torch.tensor(chosen_ids), "chosen_labels": torch.tensor(chosen_labels),
                          "rejected_input_ids": torch.tensor(rejected_ids),
                          "rejected_labels": torch.tensor(rejected_labels), "margin": torch.tensor(margin)})

        train_rows, val_rows = split_indices(len(rows), self.val_split_fraction, self.seed)
        pad_id = tokenizer.padding_id
        train = PreferenceDataset([pairs[i] for i in train_rows if pairs[i] is not None], pad_id)
        val = PreferenceDataset([pairs[i] for i in val_rows if pairs[i] is not None], pad_id)
        self._summary = (f"{len(train)} training and {len(val)} validation pairs; {self.num_truncated} of "
                         f"{self.num_examples} pairs truncated to {max_seq_length} tokens"
                         + (f" ({self.num_dropped} left out: no response token left)" if self.num_dropped else ""))
        return train, val

    def summary(self) -> str:
        return self._summary

    def sources(self) -> list[Path]:
        return [Path(self.json_path)] if self.json_path is not None else []

    def conversation(self, row: Any) -> tuple[list[dict[str, str]], str, str]:
        """A row as (prompt messages, chosen response, rejected response); a bad row raises a UserError."""
        if not isinstance(row, dict):
            raise UserError(f"expected an object, got {type(row).__name__}")
        for key, option in ((self.chosen_key, "--data.chosen_key"), (self.rejected_key, "--data.rejected_key")):
            if key not in row:
                raise UserError(f"missing key '{key}' (keys: {', '.join(row)}); pick another with {option}")
        chosen, rejected = self.messages(row, self.chosen_key), self.messages(row, self.rejected_key)
        for key, messages in ((self.chosen_key, chosen), (self.rejected_key, rejected)):
            if messages[-1]["role"] != "assistant":
                raise UserError(f"'{key}' must end with an assistant message, not a {messages[-1]['role']} one")
        if chosen[:-1] != rejected[:-1]:
            raise UserError(f"'{self.chosen_key}' and '{self.rejected_key}' must share the prompt and differ only in "
                            f"the last assistant turn; here the conversations before it differ")
        if not chosen[:-1]:
            raise UserError(f"no prompt before the assistant's response; add a '{self.prompt_key}'")
        return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]

    def margin(self, row: dict[str, Any]) -> float:
        value = row.get(self.margin_key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise UserError(f"'{self.margin_key}' must be a number, got {json.dumps(value)[:40]}")
        return float(value)



def is_transcript(text: str) -> bool:
    """Whether `text` is an hh-rlhf dialogue: "\\n\\nHuman: ..." (leading whitespace aside)."""
    return text.lstrip(" ").startswith("\n\nHuman:")


def parse_transcript(text: str) -> list[dict[str, str]]:
    """The turns of an hh-rlhf transcript as messages, each content without the whitespace around it."""
    pieces = _TRANSCRIPT_TURN.split(text.lstrip(" "))  # ["", "Human", " hi", "Assistant", " hello", ...]
    return [{"role": _TRANSCRIPT_SPEAKERS[speaker], "content": content.strip()}
            for speaker, content in zip(pieces[1::2], pieces[2::2])]


def transcript(prompt: list[dict[str, str]]) -> str:
    """The hh-rlhf text of a prompt, ending with "\\n\\nAssistant:" where the response starts."""
    speakers = {role: speaker for speaker, role in _TRANSCRIPT_SPEAKERS.items()}
    for message in prompt:
        if message["role"] not in speakers:
            raise UserError(f"--data.prompt_style transcript has Human and Assistant turns only, not "
                            f"'{message['role']}'; use --data.prompt_style chat_template")
    return "".join(f"\n\n{speakers[m['role']]}: {m['content']}" for m in prompt) + ASSISTANT_MARKER


def truncate_sequences(sequences: list[tuple[list[int], list[int]]], max_seq_length: int
                       ) -> tuple[list[tuple[list[int], list[int]]], bool]:
    """Cut the (input_ids, labels) of prompt + response sequences (prompt + chosen and prompt + rejected of a pair,
    or a single one) to `max_seq_length` tokens.

    The prompt loses tokens from the left (its end, next to the response, matters most) and the responses from the
    right. The prompt keeps at least half of `max_seq_length` when the longest response would need more, so a long
    response never pushes the whole prompt out. Returns the cut sequences and whether anything was cut.
    """
    if all(len(ids) <= max_seq_length for ids, _ in sequences):
        return sequences, False
    prompt_lengths = [prompt_length(labels) for _, labels in sequences]
    longest_response = max(len(ids) - length for (ids, _), length in zip(sequences, prompt_lengths))
    prompt_budget = max(max_seq_length // 2, max_seq_length - longest_response)
    cut = []
    for (ids, labels), length in zip(sequences, prompt_lengths):
        start = max(0, length - prompt_budget)
        cut.append((ids[start:start + max_seq_length], labels[start:start + max_seq_length]))
    return cut, True


def prompt_length(labels: list[int]) -> int:
    """The tokens before the first target: the prompt's."""
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def has_target(labels: list[int]) -> bool:
    return any(label != IGNORE_INDEX for label in labels[1:])  # the first token is never predicted


class PreferenceDataset(Dataset):
    """Tokenized pairs in memory: {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}
    (1-D LongTensors), plus "reference_chosen_logps" and "reference_rejected_logps" (scalars) once
    `set_reference_logps` has stored the reference model's log-probabilities. Batch them with `dataset.collate`.
    """

    def __init__(self, pairs: list[dict[str, torch.Tensor]], pad_id: int) -> None:
        self.pairs = pairs
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.pairs[index]

    def collate(self, pairs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """One batch of 2B sequences: the B chosen ones, then the B rejected ones, so one forward scores both.

        Returns "input_ids" and "labels" (2B, T), right-padded, the pairs' "margin" (B,), and the reference log-probs
        (B,) when stored.
        """
        sequences = [{"input_ids": pair[f"{side}_input_ids"], "labels": pair[f"{side}_labels"]}
                     for side in ("chosen", "rejected") for pair in pairs]
        batch = collate(sequences, self.pad_id)
        batch["margin"] = torch.tensor([float(pair.get("margin", 0.0)) for pair in pairs])
        for key in ("reference_chosen_logps", "reference_rejected_logps"):
            if key in pairs[0]:
                batch[key] = torch.stack([pair[key] for pair in pairs])
        return batch

    def set_reference_logps(self, indices: list[int], chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        """Store the reference log-probs of the pairs at `indices` (float32 tensors of shape (len(indices),))."""
        for index, chosen_logps, rejected_logps in zip(indices, chosen, rejected):
            self.pairs[index]["reference_chosen_logps"] = chosen_logps
            self.pairs[index]["reference_rejected_logps"] = rejected_logps
