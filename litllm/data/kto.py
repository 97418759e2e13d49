"""Unpaired feedback for KTO: a prompt, one completion, and whether people liked it (thumbs up) or not (thumbs down).

A row is `{"prompt": ..., "completion": ..., "label": true}` (keys configurable): the prompt a string, an hh-rlhf
transcript or a list of chat messages; the completion a string or a list of messages ending with the assistant's
answer; the label a JSON boolean, true for a desirable completion and false for an undesirable one. Without a prompt,
the completion holds the whole conversation (messages, or an hh-rlhf transcript) and its last assistant turn is the
completion judged.

An example is rendered and tokenized as a preference pair's response is (preference.py), with labels -100 everywhere
but the completion: its log-probability is the sum over the completion tokens only. Preference pairs serve as well:
`UnpairedDataset.from_pairs` makes each pair one desirable and one undesirable example.

KTO also needs, for each example, its prompt followed by another example's completion, to estimate the KL divergence
between the policy and the reference (see `kl_partners` and `UnpairedDataset.add_kl_sequences`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from litllm.data.jsonl import read_rows
from litllm.data.preference import PreferenceDataset, PromptedResponses, has_target, prompt_length, truncate_sequences
from litllm.data.sft import collate, split_indices, tokenize
from litllm.errors import UserError
from litllm.tokenizer import Tokenizer


@dataclass
class Unpaired(PromptedResponses):
    """Completions labelled desirable or undesirable, from a JSON or JSON Lines file, tokenized up front by `setup`.

    Attributes:
        json_path: the data file: a JSON list of objects, or JSON Lines (one object per line).
        prompt_style: how a conversation becomes text, as for preference pairs. "chat_template": the checkpoint's chat
            template. "alpaca": the Alpaca prompt around a single-turn prompt, then the completion and EOS.
            "transcript": the hh-rlhf text "\\n\\nHuman: ...\\n\\nAssistant: ...", then EOS. "auto": chat_template
            when the checkpoint has one, else alpaca.
        prompt_key: the key of the prompt; rows without it hold the whole conversation under completion_key.
        completion_key: the key of the completion (or conversation).
        label_key: the key of the label: true (desirable) or false (undesirable).
        val_split_fraction: the fraction of examples held out for validation (at least one when above 0).
        seed: the seed of the train/validation split.
    """

    json_path: Path | None = None
    prompt_style: Literal["auto", "chat_template", "alpaca", "transcript"] = "auto"
    prompt_key: str = "prompt"
    completion_key: str = "completion"
    label_key: str = "label"
    val_split_fraction: float = 0.05
    seed: int = 42

    def setup(self, tokenizer: Tokenizer, max_seq_length: int) -> tuple[UnpairedDataset, UnpairedDataset]:
        """Read, validate and tokenize every example; split into (train, validation) datasets.

        A sequence longer than `max_seq_length` loses prompt tokens from the left and completion tokens from the right
        (see `truncate_sequences`); afterwards `num_examples`, `num_truncated` and `num_dropped` (examples left with no
        completion token, and left out) say how many were.
        """
        if not 0 <= self.val_split_fraction < 1:
            raise UserError(f"--data.val_split_fraction must be in [0, 1), got {self.val_split_fraction}")
        self._check_style(tokenizer)
        if self.json_path is None:
            raise UserError("--data Unpaired needs --data.json_path FILE")
        path = Path(self.json_path)
        rows = list(read_rows(path))
        if not rows:
            raise UserError(f"{path}: no rows")
        examples: list[dict[str, torch.Tensor] | None] = []
        self.num_examples, self.num_truncated, self.num_dropped = len(rows), 0, 0
        for line, row in tqdm(rows, desc=f"Tokenizing {path.name}", unit=" examples", disable=len(rows) < 300):
            try:
                prompt, completion, desirable = self.example(row)
                input_ids, labels = tokenize(tokenizer, self.render(tokenizer, prompt, completion), True)
            except UserError as error:  # a bad row, or the chat template failed on it
                raise UserError(f"{path}:{line}: {error}") from None
            [(input_ids, labels)], truncated = truncate_sequences([(input_ids, labels)], max_seq_length)
            self.num_truncated += truncated
            if not has_target(labels):
                self.num_dropped += 1
                examples.append(None)
                continue
            examples.append({"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels),
                             "desirable": torch.tensor(desirable)})

        train_rows, val_rows = split_indices(len(rows), self.val_split_fraction, self.seed)
        pad_id = tokenizer.padding_id
        train = UnpairedDataset([examples[i] for i in train_rows if examples[i] is not None], pad_id)
        val = UnpairedDataset([examples[i] for i in val_rows if examples[i] is not None], pad_id)
        self._summary = (f"{len(train)} training and {len(val)} validation examples; {self.num_truncated} of "
                         f"{self.num_examples} examples truncated to {max_seq_length} tokens"
                         + (f" ({self.num_dropped} left out: no completion token left)" if self.num_dropped else ""))
        return train, val

    def summary(self) -> str:
        return self._summary

    def sources(self) -> list[Path]:
        return [Path(self.json_path)] if self.json_path is not None else []

    def example(self, row: Any) -> tuple[list[dict[str, str]], str, bool]:
        """A row as (prompt messages, completion, desirable); a bad row raises a UserError naming the key."""
        if not isinstance(row, dict):
            raise UserError(f"expected an object, got {type(row).__name__}")
        for key, option in ((self.completion_key, "--data.completion_key"), (self.label_key, "--data.label_key")):
            if key not in row:
                raise UserError(f"missing key '{key}' (keys: {', '.join(row)}); pick another with {option}")
        label = row[self.label_key]
        if not isinstance(label, bool):
            raise UserError(f"'{self.label_key}' must be true (desirable) or false (undesirable), a JSON boolean; "
                            f"got {json.dumps(label)[:40]}")
        messages = self.messages(row, self.completion_key)
        if messages[-1]["role"] != "assistant":
            raise UserError(f"'{self.completion_key}' must end with an assistant message, "
                            f"not a {messages[-1]['role']} one")
        if not messages[:-1]:
            raise UserError(f"no prompt before the assistant's response; add a '{self.prompt_key}'")
        return messages[:-1], messages[-1]["content"], label


def kl_partners(n_examples: int, group_size: int) -> list[int]:
    """For each example, the example whose completion its KL sequence borrows: TRL's `_get_kl_dataset`, which cuts
    the data, in order, into groups of `group_size` (its per-device batch size) and rotates the completions by one
    within each group (the first example takes the last one's completion, every other its predecessor's).

    A trailing group of one joins the group before it, so no example is its own partner (unless there is only one).
    """
    starts = list(range(0, n_examples, group_size))
    if len(starts) > 1 and n_examples - starts[-1] == 1:
        starts.pop()
    partners = []
    for start, end in zip(starts, [*starts[1:], n_examples]):
        group = list(range(start, end))
        partners += group[-1:] + group[:-1]
    return partners


class UnpairedDataset(Dataset):
    """Tokenized examples in memory: {"input_ids", "labels"} (1-D LongTensors) and "desirable" (a bool scalar); after
    `add_kl_sequences` also "kl_input_ids" and "kl_labels", and after `set_reference_logps` "reference_logps" and
    "reference_kl_logps" (float32 scalars). Batch them with `dataset.collate`.
    """

    def __init__(self, examples: list[dict[str, torch.Tensor]], pad_id: int) -> None:
        self.examples = examples
        self.pad_id = pad_id

    @classmethod
    def from_pairs(cls, pairs: PreferenceDataset) -> UnpairedDataset:
        """Each pair as two examples: prompt + chosen, desirable, and prompt + rejected, undesirable. Every chosen
        example comes first, then every rejected one (as TRL unpairs a dataset), so the neighbours that become KL
        partners hold different prompts."""
        return cls([{"input_ids": pair[f"{side}_input_ids"], "labels": pair[f"{side}_labels"],
                     "desirable": torch.tensor(side == "chosen")}
                    for side in ("chosen", "rejected") for pair in pairs.pairs], pairs.pad_id)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.examples[index]

    @property
    def num_desirable(self) -> int:
        return sum(bool(example["desirable"]) for example in self.examples)

    def add_kl_sequences(self, group_size: int, max_seq_length: int) -> None:
        """Give each example its KL sequence: its own prompt, then its KL partner's completion (see `kl_partners`),
        labelled -100 but on the completion, as the example itself is. The token ids are joined as TRL joins them, and
        cut to `max_seq_length` as an example is."""
        for example, partner in zip(self.examples, kl_partners(len(self), group_size)):
            ids, labels = example["input_ids"].tolist(), example["labels"].tolist()
            partner_ids, partner_labels = self.examples[partner]["input_ids"], self.examples[partner]["labels"]
            prompt, partner_prompt = prompt_length(labels), prompt_length(partner_labels.tolist())
            sequence = (ids[:prompt] + partner_ids[partner_prompt:].tolist(),
                        labels[:prompt] + partner_labels[partner_prompt:].tolist())
            [(kl_ids, kl_labels)], _ = truncate_sequences([sequence], max_seq_length)
            example["kl_input_ids"], example["kl_labels"] = torch.tensor(kl_ids), torch.tensor(kl_labels)

    def collate(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """One batch of B examples: "input_ids" and "labels" (B, T) of the examples and "kl_input_ids" and
        "kl_labels" (B, T') of their KL sequences, each right-padded; "desirable" (B,); and the reference log-probs
        (B,) when stored."""
        batch = collate([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples], self.pad_id)
        kl = collate([{"input_ids": e["kl_input_ids"], "labels": e["kl_labels"]} for e in examples], self.pad_id)
        batch |= {"kl_input_ids": kl["input_ids"], "kl_labels": kl["labels"],
                  "desirable": torch.stack([e["desirable"] for e in examples])}
        for key in ("reference_logps", "reference_kl_logps"):
            if key in examples[0]:
                batch[key] = torch.stack([e[key] for e in examples])
        return batch

    def set_reference_logps(self, indices: list[int], logps: torch.Tensor, kl_logps: torch.Tensor) -> None:
        """Store the reference log-probs of the examples at `indices` and of their KL sequences (float32 tensors of
        shape (len(indices),))."""
        for index, example_logps, example_kl_logps in zip(indices, logps, kl_logps):
            self.examples[index]["reference_logps"] = example_logps
            self.examples[index]["reference_kl_logps"] = example_kl_logps
