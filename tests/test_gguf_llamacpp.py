"""GGUF files llama.cpp loads: the names, keys and tensors to_gguf writes are those llama.cpp accepts.

The reference is data copied from llama.cpp's source (llama_cpp_accepted.py, version pinned there), so CI needs no
llama.cpp: the pre-tokenizer names it knows, the metadata keys it reads, the tensors and shapes each architecture
loads. Each family is a tiny random model with its family's real pre-tokenizer over SmolLM2's vocabulary
(family_tokenizers.py). benchmarks/llamacpp.py loads the same exports, and real SmolLM2 ones, in llama.cpp itself.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from tokenizers import pre_tokenizers

from family_tokenizers import (FAMILY_TOKENIZERS, QWEN2_REGEX, TOKENIZERS, save_tiny_family,
                               save_tiny_sentencepiece_llama, split_then_bytes)
from litllm.convert.from_gguf import hf_tokenizer
from litllm.convert.gguf_pre_tokenizers import BY_NAME, PRE_TOKENIZERS, PROBE, cut
from litllm.convert.to_gguf import llama_cpp_pre_tokenizer, to_gguf
from litllm.errors import UserError
from llama_cpp_accepted import LLAMA_CPP_VERSION, METADATA_KEYS, PRE_TOKENIZER_NAMES, TENSORS

@pytest.fixture(scope="module")
def family_dirs(tiny_chat_model_dir, tmp_path_factory) -> dict[str, Path]:
    return {family: save_tiny_family(family, tiny_chat_model_dir, tmp_path_factory.mktemp(family))
            for family in FAMILY_TOKENIZERS}


def test_every_pre_tokenizer_name_litllm_reads_or_writes_is_one_llama_cpp_knows():
    assert set(BY_NAME) <= PRE_TOKENIZER_NAMES, f"unknown to {LLAMA_CPP_VERSION}: {set(BY_NAME) - PRE_TOKENIZER_NAMES}"


def test_the_probe_text_tells_every_llama_cpp_pre_tokenizer_apart():
    # two entries may cut alike only when they differ in the merge rule instead (llama-bpe and smaug-bpe)
    cuts = {pre: cut(PROBE, pre.build()) for pre in PRE_TOKENIZERS}
    for i, a in enumerate(PRE_TOKENIZERS):
        for b in PRE_TOKENIZERS[i + 1:]:
            assert cuts[a] != cuts[b] or a.ignore_merges != b.ignore_merges, (a.name, b.name)


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_the_tokenizer_from_gguf_builds_for_a_name_is_named_back_by_to_gguf(name, tmp_path):
    # a GGUF vocabulary in miniature: the byte alphabet, one merge, one control token
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Ġt", "<|endoftext|>"]
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": name, "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.token_type": [1] * (len(tokens) - 1) + [3], "tokenizer.ggml.merges": ["Ġ t"]}
    tokenizer, _ = hf_tokenizer(metadata, tmp_path / "model.gguf")
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert llama_cpp_pre_tokenizer(tmp_path / "tokenizer.json") == BY_NAME[name].name


def _shape(symbols: tuple[str, ...], fields: dict, arch: str, n_tokens: int) -> tuple[int, ...]:
    head_dim = fields[f"{arch}.attention.key_length"]
    sizes = {"E": fields[f"{arch}.embedding_length"], "V": n_tokens, "F": fields[f"{arch}.feed_forward_length"],
             "Q": fields[f"{arch}.attention.head_count"] * head_dim, "D": head_dim,
             "K": fields[f"{arch}.attention.head_count_kv"] * head_dim,
             "R": fields[f"{arch}.rope.dimension_count"] // 2}
    return tuple(sizes[symbol] for symbol in symbols)


def assert_llama_cpp_accepts(reader: gguf.GGUFReader) -> dict:
    """Every metadata key one llama.cpp reads, every tensor one its architecture loads, in the shape it expects, and
    every tensor it needs there. Returns the metadata."""
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    arch = fields["general.architecture"]
    accepted_keys = {key.replace("%s", arch) for key in METADATA_KEYS}
    assert set(fields) <= accepted_keys, f"keys {LLAMA_CPP_VERSION} does not read: {set(fields) - accepted_keys}"

    n_tokens = len(fields["tokenizer.ggml.tokens"])
    expected = dict(TENSORS[arch]["model"])
    for layer in range(fields[f"{arch}.block_count"]):
        expected |= {f"blk.{layer}.{name}": spec for name, spec in TENSORS[arch]["block"].items()}
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert set(tensors) <= set(expected), f"tensors {arch} does not load: {set(tensors) - set(expected)}"
    assert {name for name, (_, required) in expected.items() if required} <= set(tensors)
    for name, tensor in tensors.items():
        assert tuple(int(n) for n in tensor.shape) == _shape(expected[name][0], fields, arch, n_tokens), name
    return fields


# the dtype changes no name, key or tensor shape: one family in q8_0 besides f16 is enough
@pytest.mark.parametrize("family, dtype", [(family, "f16") for family in FAMILY_TOKENIZERS] + [("qwen3", "q8_0")])
def test_gguf_of_every_family_holds_only_what_llama_cpp_accepts(family, dtype, family_dirs, tmp_path):
    gguf_file = to_gguf(family_dirs[family], tmp_path / "model.gguf", dtype=dtype)
    fields = assert_llama_cpp_accepts(gguf.GGUFReader(gguf_file))
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == TOKENIZERS[FAMILY_TOKENIZERS[family]][1]


def _with_pre_tokenizer(source_dir: Path, out_dir: Path, pre_tokenizer: dict, ignore_merges: bool = False) -> Path:
    shutil.copytree(source_dir, out_dir)
    spec = json.loads((out_dir / "tokenizer.json").read_text())
    spec["pre_tokenizer"], spec["model"]["ignore_merges"] = pre_tokenizer, ignore_merges
    (out_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    return out_dir


@pytest.mark.parametrize("pre_tokenizer, ignore_merges, message", [
    ({"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}, False,
     "unlike every pre-tokenizer llama.cpp knows"),
    ({"type": "Whitespace"}, False, "unlike every pre-tokenizer llama.cpp knows"),
    (split_then_bytes(QWEN2_REGEX), True, "ignores BPE merges for words that are whole tokens"),
])
def test_a_tokenizer_llama_cpp_would_cut_differently_is_refused(pre_tokenizer, ignore_merges, message,
                                                                tiny_chat_model_dir, tmp_path):
    checkpoint = _with_pre_tokenizer(tiny_chat_model_dir, tmp_path / "model", pre_tokenizer, ignore_merges)
    with pytest.raises(UserError, match=message):
        to_gguf(checkpoint, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()


def test_the_refusal_is_one_line_and_exit_code_2(tiny_chat_model_dir, tmp_path):
    checkpoint = _with_pre_tokenizer(tiny_chat_model_dir, tmp_path / "model", {"type": "Whitespace"})
    result = subprocess.run([sys.executable, "-m", "litllm", "convert", "to_gguf", str(checkpoint),
                             "--out_file", str(tmp_path / "model.gguf")], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "pre-tokenizer" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no file, no temp file


CORPUS = [Path(__file__).parent.parent / "data" / name for name in ("tiny_shakespeare.txt", "ko_nsmc_reviews.txt")]


def test_a_sentencepiece_tokenizer_exports_as_llama_cpp_llama_vocabulary(tmp_path):
    import sentencepiece

    checkpoint = save_tiny_sentencepiece_llama(tmp_path / "llama2-style", CORPUS)
    fields = assert_llama_cpp_accepts(gguf.GGUFReader(to_gguf(checkpoint, tmp_path / "model.gguf")))
    processor = sentencepiece.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))
    pieces = range(processor.get_piece_size())
    assert fields["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.pre" not in fields
    assert fields["tokenizer.ggml.tokens"] == [processor.id_to_piece(i) for i in pieces]
    np.testing.assert_array_equal(fields["tokenizer.ggml.scores"], [processor.get_score(i) for i in pieces])
    assert fields["tokenizer.ggml.token_type"][:3] == [gguf.TokenType.UNKNOWN] + [gguf.TokenType.CONTROL] * 2
    assert fields["tokenizer.ggml.token_type"].count(gguf.TokenType.BYTE) == 256
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert fields["tokenizer.ggml.add_bos_token"] and fields["tokenizer.ggml.add_space_prefix"]


@pytest.mark.parametrize("options, message", [
    (dict(legacy=False), "without sentencepiece's leading space"),
    (dict(model_type="unigram"), "sentencepiece unigram model"),
    (dict(byte_fallback=False), r"lacks \(trained without byte_fallback\)"),
    (dict(normalization_rule_name="nmt_nfkc"), r"sentencepiece normalizes text \(nmt_nfkc"),
])
def test_a_sentencepiece_tokenizer_llama_cpp_would_run_differently_is_refused(options, message, tmp_path):
    checkpoint = save_tiny_sentencepiece_llama(tmp_path / "llama2-style", CORPUS, **options)
    with pytest.raises(UserError, match=message):
        to_gguf(checkpoint, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()
