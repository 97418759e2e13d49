"""Pretraining text: files, folders and JSONL `text` fields, tokenized once into a memory-mapped token file.

Documents are whole text files and JSONL rows. They are tokenized in parallel worker processes (in input order, so
the file is the same however many workers ran) with no BOS, an EOS after each document, and written as one stream of
uint16 (uint32 for vocabularies over 65,536 tokens). The last `val_fraction` of the stream is the validation slice.

The file lives in a cache directory named by a hash of the inputs (paths, sizes, modification times), the tokenizer
files and the settings, and is written to a temp file and renamed, so a second run with the same inputs reads it
without tokenizing and a killed run never leaves half a file behind.

Training reads fixed-length windows of `max_seq_length` tokens that overlap by one token: the last token of a window,
which no position of that window predicts, is the first of the next, so every token after the first is a target
exactly once. Attention is plain causal over the window and crosses document boundaries (as in nanoGPT and LitGPT):
the EOS tells the model that what follows is a new document, and no window is wasted on padding.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from litllm.data.jsonl import read_rows
from litllm.errors import UserError
from litllm.files import atomic_file
from litllm.tokenizer import TOKENIZER_FILES, Tokenizer

FORMAT_VERSION = 1  # part of the cache key: bump when the token file layout changes
JSON_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt", ".md", ".text")


@dataclass
class TextCorpus:
    """Plain text for pretraining, tokenized once and cached.

    Attributes:
        paths: a text file, a JSONL file (one {"text": ...} object per line; a .json list works too), a folder (its
            .txt, .md, .text, .jsonl and .json files, recursively), or a list of these. A text file is one document.
        text_key: the key holding the text in JSON rows.
        val_fraction: the fraction of tokens, taken from the end of the stream, held out for validation.
        num_workers: tokenizer processes (default: one per CPU core, at most 8).
        cache_dir: where token files are kept (default: $XDG_CACHE_HOME/litllm/corpus or ~/.cache/litllm/corpus).
    """

    paths: Path | list[Path] | None = None
    text_key: str = "text"
    val_fraction: float = 0.05
    num_workers: int | None = None
    cache_dir: Path | None = None

    def setup(self, tokenizer: Tokenizer, max_seq_length: int) -> tuple[TokenWindows, TokenWindows]:
        """Tokenize (or find in the cache) the corpus; return (train, validation) windows of max_seq_length tokens."""
        prepared = self.prepare(tokenizer)
        meta = json.loads((prepared / "meta.json").read_text())
        tokens = np.memmap(prepared / "tokens.bin", dtype=meta["dtype"], mode="r")
        train = TokenWindows(tokens[:meta["train_tokens"]], max_seq_length)
        val = TokenWindows(tokens[meta["train_tokens"]:], max_seq_length)
        if self.val_fraction > 0 and not len(val):
            raise UserError(f"the validation slice has {len(tokens) - meta['train_tokens']} tokens, fewer than one "
                            f"window of {max_seq_length}; raise --data.val_fraction or lower --train.max_seq_length")
        if not len(train):
            raise UserError(f"the corpus has {meta['train_tokens']} training tokens, fewer than one window of "
                            f"{max_seq_length}; add text or lower --train.max_seq_length")
        self._summary = (f"{len(train):,} training and {len(val):,} validation windows of {max_seq_length} tokens, "
                         f"from {meta['documents']:,} documents ({meta['tokens']:,} tokens)")
        return train, val

    def summary(self) -> str:
        return self._summary

    def sources(self) -> list[Path]:
        return [Path(path) for path in ([self.paths] if isinstance(self.paths, (str, Path)) else self.paths or [])]

    def prepare(self, tokenizer: Tokenizer) -> Path:
        """The cache directory holding tokens.bin and meta.json for this corpus and tokenizer; tokenize if needed."""
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"--data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if tokenizer.eos_id is None:
            raise UserError(f"{tokenizer.checkpoint_dir}: the tokenizer has no EOS token to separate documents")
        files = self.files()
        key = self.cache_key(files, tokenizer)
        out_dir = Path(self.cache_dir or default_cache_dir()).expanduser() / key
        if (out_dir / "meta.json").is_file():
            print(f"Using the tokenized corpus cached in {out_dir}")
            return out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
        total_bytes = sum(file.stat().st_size for file in files)
        workers = self.num_workers or min(os.cpu_count() or 1, 8)
        n_tokens = n_documents = 0
        with atomic_file(out_dir / "tokens.bin") as tmp, open(tmp, "wb") as tokens, \
                tqdm(total=total_bytes, unit="B", unit_scale=True, desc="Tokenizing") as bar:
            for ids, n_bytes in _tokenize_all(tokenizer.checkpoint_dir, self.documents(files), workers):
                tokens.write(np.asarray(ids, dtype=dtype).tobytes())
                n_tokens += len(ids)
                n_documents += 1
                bar.update(n_bytes)
        meta = {"dtype": np.dtype(dtype).name, "tokens": n_tokens, "documents": n_documents,
                "train_tokens": n_tokens - int(n_tokens * self.val_fraction), "eos_id": tokenizer.eos_id,
                "files": [str(file) for file in files], "tokenizer": str(tokenizer.checkpoint_dir)}
        # meta.json last: its presence marks a complete cache entry
        with atomic_file(out_dir / "meta.json") as tmp:
            tmp.write_text(json.dumps(meta, indent=2) + "\n")
        print(f"Tokenized {n_documents:,} documents into {n_tokens:,} tokens: {out_dir}")
        return out_dir

    def files(self) -> list[Path]:
        """The input files, in order: as listed, each folder's files sorted by path."""
        if self.paths is None:
            raise UserError("no pretraining text given; pass --data.paths FILE_OR_FOLDER (or a list of them)")
        files = []
        for path in [self.paths] if isinstance(self.paths, (str, Path)) else self.paths:
            path = Path(path)
            if path.is_dir():
                found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + JSON_SUFFIXES
                               and not any(part.startswith(".") for part in p.relative_to(path).parts))
                if not found:
                    raise UserError(f"{path}: no {', '.join(TEXT_SUFFIXES + JSON_SUFFIXES)} files in this folder")
                files += found
            elif path.is_file():
                files.append(path)
            else:
                raise UserError(f"{path}: no such file or folder (--data.paths)")
        return [file.resolve() for file in files]

    def documents(self, files: list[Path]) -> Iterator[tuple[str, int]]:
        """(text, size in bytes) of every document: each text file whole, each JSON row's `text_key` field."""
        for file in files:
            if file.suffix in JSON_SUFFIXES:
                yield from self._rows(file)
                continue
            try:
                text = file.read_text(encoding="utf-8")
            except UnicodeDecodeError as error:
                raise UserError(f"{file}: not UTF-8 text ({error.reason} at byte {error.start})") from None
            yield text, file.stat().st_size

    def _rows(self, file: Path) -> Iterator[tuple[str, int]]:
        for line, row in read_rows(file):
            if not isinstance(row, dict) or self.text_key not in row:
                keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                raise UserError(f"{file}:{line}: missing key '{self.text_key}' (found: {keys}); "
                                "pick another with --data.text_key")
            text = row[self.text_key]
            if not isinstance(text, str):
                raise UserError(f"{file}:{line}: '{self.text_key}' must be a string, got {type(text).__name__}")
            yield text, len(text.encode("utf-8"))

    def cache_key(self, files: list[Path], tokenizer: Tokenizer) -> str:
        """A hash of what the token file depends on: the inputs as they are now, the tokenizer and the settings."""
        digest = hashlib.sha256()
        for file in files:
            stat = file.stat()
            digest.update(f"{file}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        for name in TOKENIZER_FILES:
            if (tokenizer.checkpoint_dir / name).is_file():
                digest.update(name.encode() + (tokenizer.checkpoint_dir / name).read_bytes())
        digest.update(json.dumps([FORMAT_VERSION, self.text_key, self.val_fraction]).encode())
        return digest.hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "litllm" / "corpus"


# ------------------------------------------------------------------------------------------ tokenizer workers

_worker_tokenizer: Tokenizer | None = None


def _start_worker(tokenizer_dir: Path) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(tokenizer_dir)


def _encode_document(document: tuple[str, int]) -> tuple[list[int], int]:
    text, n_bytes = document
    return _worker_tokenizer.encode(text, add_special_tokens=False) + [_worker_tokenizer.eos_id], n_bytes


def _tokenize_all(tokenizer_dir: Path, documents: Iterator[tuple[str, int]],
                  workers: int) -> Iterator[tuple[list[int], int]]:
    """(token ids + EOS, bytes) per document, in document order, from `workers` processes (in-process for 1)."""
    if workers <= 1:
        _start_worker(tokenizer_dir)
        yield from map(_encode_document, documents)
        return
    with multiprocessing.Pool(workers, initializer=_start_worker, initargs=(tokenizer_dir,)) as pool:
        # imap keeps the order; chunks of documents amortize the trips between processes
        yield from pool.imap(_encode_document, documents, chunksize=16)


class TokenWindows(Dataset):
    """Windows of `length` tokens over a token array, overlapping by one token (see the module docstring).

    Each item is {"input_ids", "labels"}, equal LongTensors: the loss shifts, so position t predicts token t + 1.
    """

    def __init__(self, tokens: np.ndarray, length: int) -> None:
        if length < 2:
            raise UserError(f"--train.max_seq_length must be at least 2, got {length}")
        self.tokens = tokens
        self.length = length

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // (self.length - 1))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = index * (self.length - 1)
        window = torch.from_numpy(self.tokens[start:start + self.length].astype(np.int64))
        return {"input_ids": window, "labels": window}

    def collate(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {key: torch.stack([example[key] for example in examples]) for key in examples[0]}
