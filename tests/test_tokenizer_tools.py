"""`litllm tokenizer stats` and `litllm tokenizer extend`, checked against transformers' tokenizer and model."""
import json
from pathlib import Path

import pytest
import torch

from litllm.commands import main
from litllm.checkpoint import load_model
from litllm.errors import UserError
from litllm.tokenizer import Tokenizer
from litllm.tokenizer_tools import extend, stats

DATA = Path(__file__).parent.parent / "data"
KOREAN_CORPUS = DATA / "ko_nsmc_reviews.txt"  # movie reviews: the corpus the new tokens are learned on
BASE_VOCAB_SIZE = 49152  # SmolLM2's: every id of its tokenizer, the 17 special tokens (ids 0..16) included
NUM_NEW_TOKENS = 1000


def lines_of(path: Path, limit: int | None = None) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()[:limit]


def alpaca_lines(path: Path) -> list[str]:
    rows = json.loads(path.read_text(encoding="utf-8"))
    return [line for row in rows for key in ("instruction", "input", "output") for line in row[key].splitlines()
            if line.strip()]


@pytest.fixture(scope="module")
def korean_held_out() -> list[str]:
    """Korean chatbot questions and answers: another source than the corpus, to measure the new tokens on."""
    return alpaca_lines(DATA / "ko_chatbot_demo.json")


@pytest.fixture(scope="module")
def english_texts() -> list[str]:
    return lines_of(DATA / "tiny_shakespeare.txt", 4000) + alpaca_lines(DATA / "alpaca_demo.json")


@pytest.fixture(scope="module")
def extended_dir(tiny_chat_model_dir, tmp_path_factory) -> Path:
    """The tiny model with SmolLM2's tokenizer, extended with 1,000 tokens learned on Korean reviews."""
    return extend(tiny_chat_model_dir, corpus=KOREAN_CORPUS, num_new_tokens=NUM_NEW_TOKENS,
                  out_dir=tmp_path_factory.mktemp("extend") / "ko")


def hf_tokenizer(checkpoint_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint_dir)


def hf_ids(tokenizer, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]


def test_stats_counts_match_transformers(tiny_chat_model_dir, extended_dir, tmp_path, capsys):
    text = tmp_path / "mixed.txt"
    documents = lines_of(KOREAN_CORPUS, 1500) + ["", "   "] + lines_of(DATA / "tiny_shakespeare.txt", 300)
    text.write_text("\n".join(documents) + "\n", encoding="utf-8")

    results = stats(tiny_chat_model_dir, data=text, compare=extended_dir)

    non_blank = [line for line in documents if line.strip()]
    for result, checkpoint_dir in zip(results, [tiny_chat_model_dir, extended_dir], strict=True):
        tokens = sum(map(len, hf_ids(hf_tokenizer(checkpoint_dir), non_blank)))
        assert (result.documents, result.characters, result.words, result.tokens) == (
            len(non_blank), sum(map(len, non_blank)), sum(len(line.split()) for line in non_blank), tokens)
        assert result.tokens_per_1000_chars == pytest.approx(1000 * tokens / result.characters)
        assert result.chars_per_token == pytest.approx(result.characters / tokens)
        assert result.words_per_token == pytest.approx(result.words / tokens)
    table = capsys.readouterr().out
    assert str(tiny_chat_model_dir) in table and str(extended_dir) in table and f"{results[1].tokens:,}" in table


def test_extend_keeps_every_old_token_id_and_appends_the_new_ones(tiny_chat_model_dir, extended_dir):
    base, extended = hf_tokenizer(tiny_chat_model_dir), hf_tokenizer(extended_dir)
    base_vocab, extended_vocab = base.get_vocab(), extended.get_vocab()
    assert {token: extended_vocab[token] for token in base_vocab} == base_vocab
    new_ids = sorted(set(extended_vocab.values()) - set(base_vocab.values()))
    assert new_ids == list(range(BASE_VOCAB_SIZE, BASE_VOCAB_SIZE + NUM_NEW_TOKENS))
    assert extended.all_special_ids == base.all_special_ids and extended.eos_token == base.eos_token
    # one embedding row per token, no padding rows
    config = json.loads((extended_dir / "config.json").read_text())
    assert config["vocab_size"] == len(extended) == BASE_VOCAB_SIZE + NUM_NEW_TOKENS


def test_extend_leaves_english_tokenization_unchanged(tiny_chat_model_dir, extended_dir, english_texts):
    base, extended = hf_tokenizer(tiny_chat_model_dir), hf_tokenizer(extended_dir)
    assert hf_ids(extended, english_texts) == hf_ids(base, english_texts)
    chat = [{"role": "user", "content": "What do llamas eat?"}, {"role": "assistant", "content": "Grass, mostly."}]
    assert extended.apply_chat_template(chat, tokenize=False) == base.apply_chat_template(chat, tokenize=False)
    assert Tokenizer(extended_dir).encode_chat(chat) == Tokenizer(tiny_chat_model_dir).encode_chat(chat)


def test_extend_cuts_korean_tokens_per_1000_chars_on_held_out_text(
        tiny_chat_model_dir, extended_dir, korean_held_out, tmp_path):
    held_out = tmp_path / "ko_chatbot.txt"
    held_out.write_text("\n".join(korean_held_out) + "\n", encoding="utf-8")
    before, after = stats(tiny_chat_model_dir, data=held_out, compare=extended_dir)
    assert after.tokens == sum(map(len, hf_ids(hf_tokenizer(extended_dir), korean_held_out)))
    # learned on movie reviews, measured on chat: a tokenizer extension worth its embedding rows saves far more
    # than a fifth of the tokens of its language
    assert after.tokens_per_1000_chars < 0.8 * before.tokens_per_1000_chars


def test_litllm_tokenizer_matches_transformers_on_the_new_tokens(extended_dir, korean_held_out):
    texts = korean_held_out + lines_of(KOREAN_CORPUS, 500)
    reference = hf_tokenizer(extended_dir)
    tokenizer = Tokenizer(extended_dir)
    ids = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    assert ids == hf_ids(reference, texts)
    assert [tokenizer.encode(text) for text in texts] == hf_ids(reference, texts, add_special_tokens=True)
    assert sum(token_id >= BASE_VOCAB_SIZE for row in ids for token_id in row) > 0.3 * sum(map(len, ids))
    assert [tokenizer.decode(row) for row in ids] == texts == reference.batch_decode(ids)


def test_extended_model_loads_in_transformers_and_keeps_old_logits(tiny_chat_model_dir, extended_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir, dtype=torch.float32).eval()
    extended = AutoModelForCausalLM.from_pretrained(extended_dir, dtype=torch.float32).eval()
    english = torch.tensor([Tokenizer(tiny_chat_model_dir).encode("Llamas eat grass and hay, mostly.")])
    with torch.no_grad():
        base_logits, extended_logits = base(english).logits, extended(english).logits
    assert extended_logits.shape[-1] == BASE_VOCAB_SIZE + NUM_NEW_TOKENS
    torch.testing.assert_close(extended_logits[..., :BASE_VOCAB_SIZE], base_logits)

    embedding = extended.get_input_embeddings().weight
    torch.testing.assert_close(embedding[:BASE_VOCAB_SIZE], base.get_input_embeddings().weight, rtol=0, atol=0)
    mean = base.get_input_embeddings().weight.mean(dim=0)
    torch.testing.assert_close(embedding[BASE_VOCAB_SIZE:], mean.expand(NUM_NEW_TOKENS, -1))

    # the new rows are used: litllm's model on Korean text with the new tokens equals transformers'
    korean = torch.tensor([Tokenizer(extended_dir).encode("정말 재미있는 영화였어요. 배우들 연기가 최고!")])
    assert korean.max() >= BASE_VOCAB_SIZE
    with torch.no_grad():
        torch.testing.assert_close(load_model(extended_dir)(korean), extended(korean).logits)


def test_extend_appends_after_padded_embedding_rows_and_grows_an_untied_lm_head(smollm2_dir, tmp_path):
    """A model whose embedding has rows past its tokenizer's ids (as many hub models do) keeps them; new ids start
    after them, and an untied lm_head gets its own mean rows."""
    from hf_models import save_tiny_hf_model
    from litllm.checkpoint import copy_tokenizer_files
    from transformers import AutoModelForCausalLM

    padded_vocab_size, num_new_tokens = BASE_VOCAB_SIZE + 64, 48
    base_dir = tmp_path / "padded"
    save_tiny_hf_model("llama", base_dir, vocab_size=padded_vocab_size, hidden_size=64, intermediate_size=128)
    copy_tokenizer_files(smollm2_dir, base_dir)
    corpus = tmp_path / "reviews.txt"
    corpus.write_text("\n".join(lines_of(KOREAN_CORPUS, 1000)) + "\n", encoding="utf-8")
    out_dir = tmp_path / "extended"
    out_dir.mkdir()
    (out_dir / "model-00001-of-00002.safetensors").write_text("from an earlier run")

    extend(base_dir, corpus=corpus, num_new_tokens=num_new_tokens, out_dir=out_dir, overwrite=True)

    assert not (out_dir / "model-00001-of-00002.safetensors").exists()
    reference = hf_tokenizer(out_dir)
    new_ids = sorted(set(reference.get_vocab().values()) - set(hf_tokenizer(base_dir).get_vocab().values()))
    assert new_ids == list(range(padded_vocab_size, padded_vocab_size + num_new_tokens))
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    extended = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    for name in ("input_embeddings", "output_embeddings"):
        old, new = getattr(base, f"get_{name}")().weight, getattr(extended, f"get_{name}")().weight
        assert new.shape[0] == padded_vocab_size + num_new_tokens
        torch.testing.assert_close(new[:padded_vocab_size], old, rtol=0, atol=0)
        torch.testing.assert_close(new[padded_vocab_size:], old.mean(dim=0).expand(num_new_tokens, -1))
    assert not torch.equal(extended.get_input_embeddings().weight[-1], extended.get_output_embeddings().weight[-1])
    texts, tokenizer = lines_of(KOREAN_CORPUS, 200), Tokenizer(out_dir)
    assert [tokenizer.encode(text, add_special_tokens=False) for text in texts] == hf_ids(reference, texts)


def test_extend_refuses_an_existing_out_dir_without_overwrite(tiny_chat_model_dir, extended_dir):
    before = (extended_dir / "tokenizer.json").stat().st_mtime_ns
    with pytest.raises(UserError, match="--overwrite"):
        extend(tiny_chat_model_dir, corpus=KOREAN_CORPUS, num_new_tokens=10, out_dir=extended_dir)
    assert (extended_dir / "tokenizer.json").stat().st_mtime_ns == before


def test_extend_refuses_a_tokenizer_that_is_not_byte_level_bpe(tiny_chat_model_dir, tmp_path):
    spec = json.loads((tiny_chat_model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    checkpoint_dir = tmp_path / "metaspace"
    checkpoint_dir.mkdir()
    (checkpoint_dir / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(UserError, match="tokenizer.json: .*byte-level BPE"):
        extend(checkpoint_dir, corpus=KOREAN_CORPUS, out_dir=tmp_path / "out")


def test_cli_stats_prints_one_row_per_tokenizer(tiny_chat_model_dir, extended_dir, korean_held_out, tmp_path,
                                                capsys):
    held_out = tmp_path / "ko_chatbot.txt"
    held_out.write_text("\n".join(korean_held_out) + "\n", encoding="utf-8")
    expected = stats(tiny_chat_model_dir, data=held_out, compare=extended_dir)
    capsys.readouterr()
    main(["tokenizer", "stats", str(tiny_chat_model_dir), "--data", str(held_out), "--compare", str(extended_dir)])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [row[-1] for row in rows if row[0] in (str(tiny_chat_model_dir), str(extended_dir))] == [
        f"{result.tokens:,}" for result in expected]


def test_cli_extend_without_corpus_is_a_one_line_error(tiny_chat_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["tokenizer", "extend", str(tiny_chat_model_dir), "--num_new_tokens", "10",
                  "--out_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: pass a text file in the new language to learn the tokens on: --corpus FILE"]
