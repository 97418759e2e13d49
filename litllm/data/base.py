"""The contract every kind of training data keeps, so one preparation step serves them all.

A data module (SFT rows, preference pairs, a pretraining corpus, RL prompts) is a dataclass of options (the
`--data.*` group) with `setup`, which reads and tokenizes everything once, and `summary`, one line on what came
out. Its datasets are indexable, so training can shuffle by seed and resume at an exact position, and know how
to stack their examples into a batch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from litllm.tokenizer import Tokenizer


class TrainingDataset(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]: ...

    def collate(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Examples stacked into a batch: each key a tensor with the batch first."""


class DataModule(Protocol):
    def setup(self, tokenizer: Tokenizer, max_seq_length: int) -> tuple[TrainingDataset, TrainingDataset]:
        """Read, validate and tokenize the data; return (train, validation). A bad row raises a UserError naming its
        file and line."""

    def summary(self) -> str:
        """After setup: one line on what it produced, with how many examples were truncated or left out."""

    def sources(self) -> list[Path]:
        """The files and folders it reads (which a run's output directory must never be, hold or lie inside)."""
