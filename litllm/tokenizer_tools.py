"""Tokenizer tools for a new language: what a text costs in tokens (`stats`), and a tokenizer that costs less
(`extend`: new BPE tokens learned on a corpus, appended after the old ones, with the model's embeddings grown).

How `extend` extends a byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM style):

1. Train a fresh BPE on the corpus with the `tokenizers` trainer, through the base's own normalizer, pre-tokenizer
   and 256-symbol byte alphabet, so that its tokens are strings the base could spell. Where the base keeps every
   digit a token of its own (SmolLM2, Qwen), the trainer splits digits too, so numbers tokenize as before.
2. Walk the trained merges in the order they were learned. Each one whose result `t` is not yet in the vocabulary
   becomes a new token, and the merge that builds it is re-derived: `t` is split by the base merges plus the new
   merges so far, and when that gives two pieces `(x, y)`, the merge `x y` is appended with the new id. A trained
   merge of pieces the base never produces would never fire, so it is re-derived rather than copied; the rare `t`
   that splits into three or more pieces is skipped.
3. The appended merges rank after every base merge, so BPE runs the base merges to completion first: a text on
   which no new merge fires (English, code) tokenizes exactly as before, and every old token and added (special)
   token keeps its id.

Why merges and not `add_tokens`: added tokens are matched greedily in the raw text before BPE runs, even inside
words (an added "사랑" would cut "사랑니" apart), and they are not merged with their neighbours; new BPE merges
instead take part in tokenization the way the base's own tokens do.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import tokenizers
from tokenizers import pre_tokenizers, trainers
from tqdm import tqdm

from litllm.checkpoint import check_checkpoint_dir, is_model_dir_file, load_model, write_model_files
from litllm.files import atomic_dir, check_out_dir, refuse_to_overwrite
from litllm.errors import UserError
from litllm.model import GPT
from litllm.tokenizer import TOKENIZER_FILES, Tokenizer


@dataclass
class TokenizerStats:
    """Token counts of one tokenizer on one text file; the file's lines are the documents."""

    tokenizer: str
    documents: int
    characters: int
    words: int  # whitespace-separated words (eojeol for Korean)
    tokens: int

    @property
    def chars_per_token(self) -> float:
        return self.characters / max(self.tokens, 1)

    @property
    def words_per_token(self) -> float:
        return self.words / max(self.tokens, 1)

    @property
    def tokens_per_1000_chars(self) -> float:
        return 1000 * self.tokens / max(self.characters, 1)


def stats(checkpoint_dir: Path, data: Path | None = None, compare: Path | None = None) -> list[TokenizerStats]:
    """Characters, words and tokens per token of a text file, for one tokenizer or two side by side.

    Each line of the file is one document, tokenized without special tokens.

    Args:
        checkpoint_dir: The checkpoint whose tokenizer to measure.
        data: A UTF-8 text file, one document per line (required).
        compare: A second checkpoint whose tokenizer to measure on the same file.
    """
    # An option rather than a positional argument, as in `litllm tokenizer stats CKPT --data FILE`
    if data is None:
        raise UserError("pass the text file to measure: --data FILE")
    data = Path(data)
    if not data.is_file():
        raise UserError(f"{data}: text file not found")
    results = [count_tokens(Tokenizer(check_checkpoint_dir(directory)), data, name=str(directory))
               for directory in [checkpoint_dir, *([compare] if compare is not None else [])]]
    print_stats(results, data)
    return results


def count_tokens(tokenizer: Tokenizer, data: Path, name: str) -> TokenizerStats:
    """Count the non-blank lines of `data`, their characters, words and tokens (no special tokens)."""
    result = TokenizerStats(tokenizer=name, documents=0, characters=0, words=0, tokens=0)
    with tqdm(total=data.stat().st_size, desc=f"Tokenizing {data.name}", unit="B", unit_scale=True,
              disable=data.stat().st_size < 10_000_000) as bar:
        for line in _read_lines(data):
            bar.update(len(line.encode("utf-8")) + 1)
            if not line.strip():
                continue
            result.documents += 1
            result.characters += len(line)
            result.words += len(line.split())
            result.tokens += len(tokenizer.encode(line, add_special_tokens=False))
    return result


def print_stats(results: list[TokenizerStats], data: Path) -> None:
    """One row per tokenizer, under a line that describes the file."""
    first = results[0]
    print(f"{data}: {first.documents:,} documents, {first.characters:,} characters, {first.words:,} words")
    width = max(len("tokenizer"), *(len(result.tokenizer) for result in results))
    print(f"{'tokenizer':<{width}}  chars/token  words/token  tokens/1k chars  total tokens")
    for result in results:
        print(f"{result.tokenizer:<{width}}  {result.chars_per_token:>11.3f}  {result.words_per_token:>11.3f}  "
              f"{result.tokens_per_1000_chars:>15.1f}  {result.tokens:>12,}")


def extend(checkpoint_dir: Path, corpus: Path | None = None, num_new_tokens: int = 1000, out_dir: Path | None = None,
           overwrite: bool = False) -> Path:
    """Learn new BPE tokens on a corpus, append them to the tokenizer and grow the model's embeddings to match.

    Old tokens keep their ids and text without the new tokens tokenizes as before; new embedding (and untied
    lm_head) rows start as the mean of the old rows, for continued pretraining to train. The output is a Hugging
    Face model dir with the tokenizer files (chat template included) beside it.

    Args:
        checkpoint_dir: The checkpoint to extend; its tokenizer.json must be a byte-level BPE.
        corpus: A UTF-8 text file in the new language, one document per line (required).
        num_new_tokens: How many tokens to add (fewer when the corpus has fewer to give).
        out_dir: The directory to write the extended checkpoint into (default: <checkpoint_dir>-extended beside it).
        overwrite: Replace a model dir at out_dir (only a model dir: any other file found there stops the command).
    """
    checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
    # An option rather than a positional argument, as in `litllm tokenizer extend CKPT --corpus FILE`
    if corpus is None:
        raise UserError("pass a text file in the new language to learn the tokens on: --corpus FILE")
    corpus = Path(corpus)
    out_dir = Path(out_dir) if out_dir is not None else checkpoint_dir.with_name(f"{checkpoint_dir.name}-extended")
    if not corpus.is_file():
        raise UserError(f"{corpus}: corpus file not found")
    if num_new_tokens < 1:
        raise UserError(f"--num_new_tokens must be at least 1, got {num_new_tokens}")
    check_out_dir(out_dir, inputs=[checkpoint_dir, corpus])
    refuse_to_overwrite(out_dir, overwrite, owned=is_model_dir_file)
    base = _read_byte_level_bpe(checkpoint_dir / "tokenizer.json")

    model = load_model(checkpoint_dir)
    # After every id the tokenizer or the model uses: some checkpoints pad the embedding past the tokenizer.
    first_new_id = max(model.config.vocab_size, _max_token_id(base) + 1)
    print(f"Learning {num_new_tokens} new tokens on {corpus}")
    extended, new_tokens = extend_byte_level_bpe(base, corpus, num_new_tokens, first_new_id)
    if not new_tokens:
        raise UserError(f"{corpus}: no new tokens to learn (the tokenizer already has every frequent pair as a "
                        "token); use a larger corpus in the new language")
    if len(new_tokens) < num_new_tokens:
        print(f"The corpus gave only {len(new_tokens)} new tokens (pairs seen at least twice)")
    old_rows = model.config.vocab_size
    grow_embeddings(model, first_new_id + len(new_tokens))

    with atomic_dir(out_dir) as tmp:
        write_model_files(model, tmp)
        (tmp / "tokenizer.json").write_text(json.dumps(extended, ensure_ascii=False, indent=2), encoding="utf-8")
        # vocab.json/merges.txt/tokenizer.model would hold the old vocabulary, so only the files without one are kept
        for name in set(TOKENIZER_FILES) - {"tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt"}:
            if (checkpoint_dir / name).is_file():
                (tmp / name).write_bytes((checkpoint_dir / name).read_bytes())
        print_stats([count_tokens(Tokenizer(checkpoint_dir), corpus, name=str(checkpoint_dir)),
                     count_tokens(Tokenizer(tmp), corpus, name=str(out_dir))], corpus)
    print(f"Added {len(new_tokens)} tokens (ids {first_new_id}..{first_new_id + len(new_tokens) - 1}); "
          f"embedding rows {old_rows} -> {model.config.vocab_size}. Wrote {out_dir}")
    return out_dir


def extend_byte_level_bpe(base: dict[str, Any], corpus: Path, num_new_tokens: int,
                          first_new_id: int) -> tuple[dict[str, Any], list[str]]:
    """The tokenizer.json dict `base` with up to `num_new_tokens` tokens learned on `corpus` appended as BPE
    merges, ids from `first_new_id` on; and the new tokens, in id order (see the module docstring)."""
    # The trainer also learns tokens the base already has: train more merges until enough are new, or until the
    # corpus has no pair left that occurs twice.
    num_merges = 2 * num_new_tokens
    while True:
        trained_merges = _train_merges(base, corpus, num_merges)
        vocab = dict(base["model"]["vocab"])
        merges = [_parse_merge(merge) for merge in base["model"]["merges"]]
        ranks = {merge: rank for rank, merge in enumerate(merges)}
        new_tokens: list[str] = []
        for left, right in trained_merges:
            token = left + right
            if token in vocab:
                continue
            pieces = _bpe(token, ranks)
            if len(pieces) != 2:
                continue
            vocab[token] = first_new_id + len(new_tokens)
            ranks[(pieces[0], pieces[1])] = len(merges)
            merges.append((pieces[0], pieces[1]))
            new_tokens.append(token)
            if len(new_tokens) == num_new_tokens:
                break
        if len(new_tokens) == num_new_tokens or len(trained_merges) < num_merges:
            break
        num_merges *= 2

    # tokenizer.json writes a merge as ["a", "b"] since tokenizers 0.20 and as "a b" before; keep the file's form
    as_strings = bool(base["model"]["merges"]) and isinstance(base["model"]["merges"][0], str)
    merges_json = [" ".join(merge) if as_strings else list(merge) for merge in merges]
    return {**base, "model": {**base["model"], "vocab": vocab, "merges": merges_json}}, new_tokens


def grow_embeddings(model: GPT, vocab_size: int) -> None:
    """Append rows to embed_tokens (and lm_head when untied) up to `vocab_size`, each the mean of the old rows.

    The mean keeps a new token's logit close to the average old one, so the grown model's next-token distribution
    barely moves before training (Hewitt, "Initializing New Word Embeddings for Pretrained Language Models", 2021).
    """
    old_size = model.config.vocab_size
    with torch.no_grad():
        matrices = [model.embed_tokens] + ([] if model.config.tie_embeddings else [model.lm_head])
        for module in matrices:
            weight = module.weight
            mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)  # (1, hidden_size)
            module.weight = torch.nn.Parameter(torch.cat([weight, mean.expand(vocab_size - old_size, -1)]))
    model.embed_tokens.num_embeddings = vocab_size
    model.lm_head.out_features = vocab_size
    if model.config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.config.vocab_size = vocab_size


def _train_merges(base: dict[str, Any], corpus: Path, num_merges: int) -> list[tuple[str, str]]:
    """Up to `num_merges` merges learned on `corpus` from bytes up, in the order the trainer learned them."""
    spec = {**base, "added_tokens": [], "post_processor": None, "model": {**base["model"], "vocab": {}, "merges": []}}
    if not any(len(token) > 1 and any(char in "0123456789" for char in token) for token in base["model"]["vocab"]):
        # The base keeps every digit a token of its own (SmolLM2, Qwen), as its pre-tokenizer's Digits step does or
        # as a file that lost that step still shows in its vocabulary; learn no token that joins a digit either.
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, base["pre_tokenizer"]]}
    trainer_tokenizer = tokenizers.Tokenizer.from_str(json.dumps(spec))
    # split out of the text as the base does, so that their pieces are not learned as tokens
    special_tokens = [token["content"] for token in base["added_tokens"]]
    trainer = trainers.BpeTrainer(
        vocab_size=len(special_tokens) + 256 + num_merges,  # the trainer's vocabulary: specials, bytes, merges
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=special_tokens,
        show_progress=os.isatty(2),
    )
    trainer_tokenizer.train_from_iterator(_read_lines(corpus), trainer)
    return [_parse_merge(merge) for merge in json.loads(trainer_tokenizer.to_str())["model"]["merges"]]


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Split `word` (in the byte-level alphabet) as BPE does: merge the lowest-ranked adjacent pair until none is left."""
    pieces = list(word)
    while len(pieces) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(pieces, pieces[1:])))
        if rank == len(ranks):
            break
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def _parse_merge(merge: str | list[str]) -> tuple[str, str]:
    # byte-level tokens never hold a space (it is spelled "Ġ"), so "a b" splits unambiguously
    left, right = merge.split(" ") if isinstance(merge, str) else merge
    return left, right


def _max_token_id(tokenizer_json: dict[str, Any]) -> int:
    return max([*tokenizer_json["model"]["vocab"].values(), *(token["id"] for token in tokenizer_json["added_tokens"])])


def _read_byte_level_bpe(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path} not found; `tokenizer extend` needs the checkpoint's tokenizer.json")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"{path}:{error.lineno}: invalid JSON: {error.msg}") from error
    model = spec.get("model") or {}
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
    if (model.get("type") != "BPE" or not byte_level or model.get("continuing_subword_prefix")
            or model.get("end_of_word_suffix")):
        raise UserError(
            f"{path}: `tokenizer extend` supports byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM style); "
            f"this one is {model.get('type')} with pre-tokenizer {(spec.get('pre_tokenizer') or {}).get('type')}"
        )
    return spec


def _read_lines(path: Path) -> Iterator[str]:
    with path.open("rb") as file:  # decoded line by line, so that an error names its line
        for line_number, line in enumerate(file, start=1):
            try:
                yield line.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as error:
                raise UserError(f"{path}:{line_number}: not UTF-8 ({error.reason}); convert the file to UTF-8") from None
