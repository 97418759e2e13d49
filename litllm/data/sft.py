"""Supervised fine-tuning data: instruction/response rows and chat conversations, tokenized with loss masks.

Every row becomes one text, either the checkpoint's chat template rendering of the conversation or the classic
Alpaca prompt followed by the response, plus the character spans the model should learn to write (the responses).
The text is tokenized as a whole, exactly as inference will see it, and the spans are mapped onto its tokens; every
other token gets the label -100. Labels are not shifted: position t holds token t, and the loss shifts.
"""
from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from litllm.data.jsonl import read_rows
from litllm.errors import UserError
from litllm.tokenizer import Tokenizer

IGNORE_INDEX = -100  # the label of a token that is not a target (torch's cross_entropy ignore_index)

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
CHAT_ROLES = ("system", "user", "assistant", "tool")

# What collate pads each field with: padding is never a target, and sits in a document of its own.
PAD_VALUES = {"labels": IGNORE_INDEX, "position_ids": 0, "document_ids": -1}


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt for an instruction (and optional input), ending where the response starts."""
    if input_text:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT.format(instruction=instruction)


@dataclass
class Rendered:
    """A row as the text the model sees, and the character spans [start, end) of the text it learns to write."""

    text: str
    response_spans: list[tuple[int, int]]
    add_special_tokens: bool  # False for chat templates, which write BOS and the like themselves
    append_eos: bool


@dataclass
class SFTData(ABC):
    """Fine-tuning rows from a JSON or JSON Lines file, tokenized up front by `setup`.

    Attributes:
        json_path: the data file: a JSON list of objects, or JSON Lines (one object per line).
        mask_prompt: compute the loss on the response (assistant) tokens only, not on the prompt.
        val_split_fraction: the fraction of rows held out for validation (at least one row when above 0).
        packing: concatenate several training examples into each sequence of up to max_seq_length tokens, with
            positions and attention restarting at every example boundary (validation examples stay unpacked).
        seed: the seed of the train/validation split.
    """

    json_path: Path | None = None
    mask_prompt: bool = True
    val_split_fraction: float = 0.05
    packing: bool = False
    seed: int = 42

    def setup(self, tokenizer: Tokenizer, max_seq_length: int) -> tuple[SFTDataset, SFTDataset]:
        """Read, validate and tokenize every row; split into (train, validation) datasets.

        Examples longer than `max_seq_length` are truncated; afterwards `num_examples`, `num_truncated` and
        `num_dropped` (truncated so far that no response token is left, and left out) say how many.
        """
        if not 0 <= self.val_split_fraction < 1:
            raise UserError(f"--data.val_split_fraction must be in [0, 1), got {self.val_split_fraction}")
        self.prepare(tokenizer)
        path = self.data_file()
        rows = list(read_rows(path))
        if not rows:
            raise UserError(f"{path}: no rows")
        examples: list[dict[str, torch.Tensor] | None] = []
        self.num_examples, self.num_truncated, self.num_dropped = len(rows), 0, 0
        for line, row in tqdm(rows, desc=f"Tokenizing {path.name}", unit=" rows", disable=len(rows) < 300):
            if not isinstance(row, dict):
                raise UserError(f"{path}:{line}: expected an object, got {type(row).__name__}")
            try:
                input_ids, labels = tokenize(tokenizer, self.render(tokenizer, row), self.mask_prompt)
            except UserError as error:  # a bad row, or the chat template failed on it
                raise UserError(f"{path}:{line}: {error}") from None
            if len(input_ids) > max_seq_length:
                self.num_truncated += 1
                input_ids, labels = input_ids[:max_seq_length], labels[:max_seq_length]
                if all(label == IGNORE_INDEX for label in labels[1:]):
                    self.num_dropped += 1
                    examples.append(None)
                    continue
            examples.append({"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels)})

        train_rows, val_rows = split_indices(len(rows), self.val_split_fraction, self.seed)
        train = [examples[i] for i in train_rows if examples[i] is not None]
        val = [examples[i] for i in val_rows if examples[i] is not None]
        pad_id = tokenizer.padding_id
        if self.packing:
            train = pack(train, max_seq_length)
        self._summary = (f"{len(train)} training and {len(val)} validation sequences; {self.num_truncated} of "
                         f"{self.num_examples} examples truncated to {max_seq_length} tokens"
                         + (f" ({self.num_dropped} left out: no response token left)" if self.num_dropped else ""))
        return SFTDataset(train, pad_id), SFTDataset(val, pad_id)

    def summary(self) -> str:
        return self._summary

    def sources(self) -> list[Path]:
        return [Path(self.json_path)] if self.json_path is not None else []

    def data_file(self) -> Path:
        if self.json_path is None:
            raise UserError(f"--data {type(self).__name__} needs --data.json_path FILE")
        return Path(self.json_path)

    def prepare(self, tokenizer: Tokenizer) -> None:
        """Check, before reading any row, that this data can be rendered with this tokenizer."""

    @abstractmethod
    def render(self, tokenizer: Tokenizer, row: dict[str, Any]) -> Rendered:
        """One row as text and response spans; a bad row raises a UserError saying what is wrong with it."""


@dataclass
class JSON(SFTData):
    """Instruction/response rows from any JSON or JSON Lines file, with configurable keys.

    A row is `{"instruction": ..., "input": ..., "output": ...}` by default; the input may be missing or empty.

    Attributes:
        prompt_style: how a row becomes text. "chat_template": the instruction (and input) as the user message and
            the response as the assistant message, rendered by the checkpoint's chat template. "alpaca": the
            Alpaca prompt ("Below is an instruction that describes a task...") and the response, then EOS.
            "auto": chat_template when the checkpoint has one, else alpaca.
        prompt_key: the key of the instruction.
        input_key: the key of the optional input (context) that follows the instruction; it may be missing.
        response_key: the key of the response.
    """

    prompt_style: Literal["auto", "chat_template", "alpaca"] = "auto"
    prompt_key: str = "instruction"
    input_key: str = "input"
    response_key: str = "output"

    def prepare(self, tokenizer: Tokenizer) -> None:
        if self.prompt_style not in ("auto", "chat_template", "alpaca"):
            raise UserError(
                f"--data.prompt_style must be one of auto, chat_template, alpaca; got {self.prompt_style!r}"
            )
        if self.prompt_style == "chat_template" and tokenizer.chat_template is None:
            raise UserError(
                f"{tokenizer.checkpoint_dir} has no chat template; use --data.prompt_style alpaca "
                "(or auto) with this checkpoint"
            )
        self.use_chat_template = self.prompt_style != "alpaca" and tokenizer.chat_template is not None
        if not self.use_chat_template and tokenizer.eos_id is None:
            raise UserError(f"{tokenizer.checkpoint_dir} has no eos_token to end Alpaca-style responses with")

    def render(self, tokenizer: Tokenizer, row: dict[str, Any]) -> Rendered:
        instruction = _string(row, self.prompt_key, "--data.prompt_key")
        response = _string(row, self.response_key, "--data.response_key")
        has_input = row.get(self.input_key) is not None
        input_text = _string(row, self.input_key, "--data.input_key") if has_input else ""
        if self.use_chat_template:
            user = f"{instruction}\n\n{input_text}" if input_text else instruction
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
            return render_chat(tokenizer, messages)
        prompt = alpaca_prompt(instruction, input_text)
        return Rendered(prompt + response, [(len(prompt), len(prompt) + len(response))],
                        add_special_tokens=True, append_eos=True)


@dataclass
class Alpaca(JSON):
    """Alpaca instruction data: by default the 52k cleaned rows of the hub dataset yahma/alpaca-cleaned.

    Rows hold `instruction`, `input` (may be empty) and `output`; the hub file is downloaded once and cached.

    Attributes:
        json_path: a local file in the Alpaca format instead of the hub download (e.g. data/alpaca_demo.json).
    """

    REPO_ID = "yahma/alpaca-cleaned"
    FILENAME = "alpaca_data_cleaned.json"

    def data_file(self) -> Path:
        if self.json_path is not None:
            return Path(self.json_path)
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError

        try:
            return Path(hf_hub_download(self.REPO_ID, self.FILENAME, repo_type="dataset"))
        except (HfHubHTTPError, OSError) as error:  # offline, or the hub is unreachable
            raise UserError(
                f"could not download {self.FILENAME} from the hub dataset {self.REPO_ID} ({type(error).__name__}); "
                "check your network, or pass a local Alpaca-format file with --data.json_path FILE"
            ) from None


@dataclass
class Chat(SFTData):
    """Conversations in the OpenAI messages format, rendered with the checkpoint's chat template.

    A row is `{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}`.
    With mask_prompt, the loss is on every assistant turn, including the end-of-turn token the template writes
    after it, so the model learns where to stop.

    Attributes:
        messages_key: the key of the message list in each row.
    """

    messages_key: str = "messages"

    def prepare(self, tokenizer: Tokenizer) -> None:
        if tokenizer.chat_template is None:
            raise UserError(
                f"{tokenizer.checkpoint_dir} has no chat template, which --data Chat needs to render conversations; "
                "use a chat/instruct checkpoint, or instruction rows with --data JSON --data.prompt_style alpaca"
            )

    def render(self, tokenizer: Tokenizer, row: dict[str, Any]) -> Rendered:
        if self.messages_key not in row:
            raise UserError(f"missing key '{self.messages_key}' (keys: {', '.join(row)}); "
                            "pick another with --data.messages_key")
        messages = check_messages(row[self.messages_key], self.messages_key)
        if not any(message["role"] == "assistant" for message in messages):
            raise UserError("no assistant message, so nothing to learn from this conversation")
        return render_chat(tokenizer, messages)


def check_messages(messages: Any, key: str) -> list[dict[str, str]]:
    """`messages` (the value of `key` in a row) as a list of {"role", "content"}; a UserError names what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"'{key}' must be a non-empty list of messages, got {type(messages).__name__}")
    for index, message in enumerate(messages):
        name = f"{key}[{index}]"
        if not isinstance(message, dict):
            raise UserError(f"{name} must be an object with 'role' and 'content', got {type(message).__name__}")
        for field in ("role", "content"):
            if field not in message:
                raise UserError(f"{name}: missing key '{field}' (keys: {', '.join(message)})")
        if message["role"] not in CHAT_ROLES:
            raise UserError(f"{name}.role must be one of {', '.join(CHAT_ROLES)}; got {message['role']!r}")
        if not isinstance(message["content"], str):
            raise UserError(f"{name}.content must be a string, got {type(message['content']).__name__}")
    return [{"role": message["role"], "content": message["content"]} for message in messages]


def _string(row: dict[str, Any], key: str, option: str) -> str:
    if key not in row:
        raise UserError(f"missing key '{key}' (keys: {', '.join(row)}); pick another with {option}")
    if not isinstance(row[key], str):
        raise UserError(f"key '{key}' must be a string, got {type(row[key]).__name__}")
    return row[key]


def render_chat(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> Rendered:
    """The conversation as the chat template writes it, with the span of each assistant turn: from the end of the
    generation prompt before it to the end of its end-of-turn marker (whitespace between turns left out)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:index], add_generation_prompt=True)
        is_last = index == len(messages) - 1
        turn = text if is_last else tokenizer.apply_chat_template(messages[:index + 1], add_generation_prompt=False)
        if text.startswith(prompt) and text.startswith(turn):
            start, end = len(prompt), len(turn)
        else:
            # The template writes a turn differently once more turns follow (Qwen3 keeps the reasoning block of the
            # last turn only): find the content in the whole text and extend it by the marker the template writes
            # after it.
            content = message["content"]
            start = text.find(content, spans[-1][1] if spans else 0)
            if start < 0:
                raise UserError("the chat template does not write an assistant message's content as given")
            end = start + len(content)
            end_of_turn = turn[turn.rfind(content) + len(content):]
            if text.startswith(end_of_turn, end):
                end += len(end_of_turn)
            if text.startswith(prompt) and len(prompt) <= start:
                start = len(prompt)
        end = start + len(text[start:end].rstrip())
        spans.append((start, end))
    return Rendered(text, spans, add_special_tokens=False, append_eos=False)


def tokenize(tokenizer: Tokenizer, rendered: Rendered, mask_prompt: bool) -> tuple[list[int], list[int]]:
    """Token ids of the whole text, and labels: the ids inside the response spans, -100 elsewhere (everywhere the
    ids when not `mask_prompt`)."""
    input_ids = tokenizer.encode(rendered.text, add_special_tokens=rendered.add_special_tokens)
    if mask_prompt:
        labels = [IGNORE_INDEX] * len(input_ids)
        token_index = _token_indices(tokenizer, rendered, input_ids)
        for start, end in rendered.response_spans:
            labels[token_index[start]:token_index[end]] = input_ids[token_index[start]:token_index[end]]
    else:
        labels = list(input_ids)
    if rendered.append_eos and input_ids[-1:] != [tokenizer.eos_id]:
        input_ids.append(tokenizer.eos_id)
        labels.append(tokenizer.eos_id)
    return input_ids, labels


def _token_indices(tokenizer: Tokenizer, rendered: Rendered, input_ids: list[int]) -> dict[int, int]:
    """For each span boundary (a character offset), how many tokens of `input_ids` come wholly before it.

    The text is tokenized once, as at inference, so a token could merge characters from both sides of a boundary.
    Usually it does not (boundaries sit next to special tokens and newlines), which the quick way checks: the
    pieces between boundaries, tokenized alone, add up to the whole. Otherwise each boundary counts the common
    prefix of the whole's tokens and its text-up-to-the-boundary's tokens, so a merged token counts as after it.
    """
    text = rendered.text
    boundaries = sorted({offset for span in rendered.response_spans for offset in span})
    if not rendered.add_special_tokens:  # else BOS/EOS would be added to every piece
        cuts = [0, *boundaries, len(text)]
        pieces = [tokenizer.encode(text[start:end], add_special_tokens=False) for start, end in zip(cuts, cuts[1:])]
        if [token for piece in pieces for token in piece] == input_ids:
            return dict(zip(boundaries, itertools.accumulate(len(piece) for piece in pieces)))
    indices = {}
    for offset in boundaries:
        prefix = tokenizer.encode(text[:offset], add_special_tokens=rendered.add_special_tokens)
        indices[offset] = next(
            (index for index, (a, b) in enumerate(zip(prefix, input_ids)) if a != b), min(len(prefix), len(input_ids))
        )
    return indices


def split_indices(num_rows: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) row indices: a random split fixed by `seed`, each part in file order."""
    num_val = 0 if val_fraction == 0 or num_rows < 2 else min(num_rows - 1, max(1, round(num_rows * val_fraction)))
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[num_val:]), sorted(order[:num_val])


def pack(examples: list[dict[str, torch.Tensor]], max_seq_length: int) -> list[dict[str, torch.Tensor]]:
    """Concatenate consecutive examples into rows of at most `max_seq_length` tokens (a new row starts when the next
    example does not fit).

    Each row also holds `position_ids`, restarting at 0 in every document, and `document_ids` (0, 1, 2, ... in the
    row), from which the model builds a block-diagonal causal mask. The first label of each document is -100: it
    would be predicted from the end of the previous document, and unpacked it is never a target either.
    """
    rows, documents, length = [], [], 0
    for example in examples:
        if documents and length + len(example["input_ids"]) > max_seq_length:
            rows.append(_concatenate(documents))
            documents, length = [], 0
        documents.append(example)
        length += len(example["input_ids"])
    if documents:
        rows.append(_concatenate(documents))
    return rows


def _concatenate(documents: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    labels = [document["labels"].clone() for document in documents]
    for document_labels in labels:
        document_labels[0] = IGNORE_INDEX
    lengths = [len(document["input_ids"]) for document in documents]
    return {
        "input_ids": torch.cat([document["input_ids"] for document in documents]),
        "labels": torch.cat(labels),
        "position_ids": torch.cat([torch.arange(length) for length in lengths]),
        "document_ids": torch.cat([torch.full((length,), index) for index, length in enumerate(lengths)]),
    }


def collate(examples: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack examples into a batch, right-padded to the longest: each key becomes a (B, T) LongTensor."""
    length = max(len(example["input_ids"]) for example in examples)
    return {
        key: torch.stack([F.pad(example[key], (0, length - len(example[key])), value=PAD_VALUES.get(key, pad_id))
                          for example in examples])
        for key in examples[0]
    }


class SFTDataset(Dataset):
    """Tokenized examples in memory, indexable so that training can shuffle by seed and resume at a position.

    Each example is {"input_ids", "labels"} (1-D LongTensors of the same length), plus "position_ids" and
    "document_ids" when packed. Batch them with `dataset.collate`.
    """

    def __init__(self, examples: list[dict[str, torch.Tensor]], pad_id: int) -> None:
        self.examples = examples
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.examples[index]

    def collate(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return collate(examples, self.pad_id)
