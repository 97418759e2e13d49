"""GGUF files llama.cpp loads: the names, keys and tensors to_gguf writes are those llama.cpp accepts.

Without llama.cpp (CI), the reference is data copied from its source (llama_cpp_accepted.py, version pinned there): the
pre-tokenizer names it knows, the metadata keys it reads, the tensors and shapes each architecture loads. Each family
is a tiny random model with its family's real pre-tokenizer over SmolLM2's vocabulary. With llama-cpp-python
installed, the same exports are loaded in llama.cpp itself and must tokenize and score like litllm
(benchmarks/llamacpp.py does the same for real SmolLM2 exports and times them).
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers

from hf_models import save_tiny_hf_model
from litllm.checkpoint import copy_tokenizer_files, load_model
from litllm.convert.from_gguf import hf_tokenizer
from litllm.convert.gguf_pre_tokenizers import BY_NAME, PRE_TOKENIZERS, PROBE, cut
from litllm.convert.to_gguf import llama_cpp_pre_tokenizer, to_gguf
from litllm.errors import UserError
from litllm.tokenizer import Tokenizer as LitTokenizer
from llama_cpp_accepted import LLAMA_CPP_VERSION, METADATA_KEYS, PRE_TOKENIZER_NAMES, TENSORS

# Each family's pre-tokenizer as its published tokenizer.json spells it, and whether its BPE ignores merges for
# words that are whole tokens.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split_then_bytes(regex: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


TOKENIZERS = {
    # (normalizer, pre_tokenizer, ignore_merges), None: SmolLM2's own; the name llama.cpp's converter writes for it
    "smollm2": (None, "smollm"),
    "llama3": ((None, _split_then_bytes(_LLAMA3_REGEX), True), "llama-bpe"),
    "qwen2": (({"type": "NFC"}, _split_then_bytes(_QWEN2_REGEX), False), "qwen2"),
    "tekken": ((None, _split_then_bytes(_TEKKEN_REGEX), True), "tekken"),
}
# litllm family (tests/hf_models.py) -> the tokenizer its real checkpoints ship
FAMILIES = {"tied": "smollm2", "llama3-rope": "llama3", "mistral-sliding": "tekken", "qwen2": "qwen2",
            "qwen2-yarn": "qwen2", "qwen3": "qwen2"}
TEXTS = ["Hello, world! It's 2024: the quick brown fox.\n\n  def f(x):\treturn x**2",
         "안녕하세요, 만나서 반갑습니다. 오늘 날씨가 정말 좋네요! 123,456원",
         "<|im_start|>user\n한국어로 대답해 주세요<|im_end|>\n<|im_start|>assistant\n"]


def write_family_tokenizer(source_dir: Path, out_dir: Path, tokenizer: str) -> None:
    """SmolLM2's tokenizer files, with `tokenizer`'s normalizer, pre-tokenizer and merge rule in tokenizer.json."""
    copy_tokenizer_files(source_dir, out_dir)
    if TOKENIZERS[tokenizer][0] is None:
        return
    normalizer, pre_tokenizer, ignore_merges = TOKENIZERS[tokenizer][0]
    spec = json.loads((out_dir / "tokenizer.json").read_text())
    spec["normalizer"], spec["pre_tokenizer"] = normalizer, pre_tokenizer
    spec["model"]["ignore_merges"] = ignore_merges
    (out_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))


@pytest.fixture(scope="module")
def family_dirs(tiny_chat_model_dir, tmp_path_factory) -> dict[str, Path]:
    """A tiny random model of each family with SmolLM2's vocabulary (49152 tokens) and the family's pre-tokenizer."""
    dirs = {}
    for family, tokenizer in FAMILIES.items():
        out = tmp_path_factory.mktemp(family)
        save_tiny_hf_model(family, out, vocab_size=49152, hidden_size=64, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        write_family_tokenizer(tiny_chat_model_dir, out, tokenizer)
        dirs[family] = out
    return dirs


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


def test_smollm2_keeps_its_pre_tokenizer_name_from_gguf_to_gguf(smollm2_gguf, tiny_chat_model_dir, tmp_path):
    # tiny_chat_model_dir's tokenizer is the one from_gguf unpacked from the real SmolLM2 GGUF
    original = gguf.GGUFReader(smollm2_gguf).fields["tokenizer.ggml.pre"].contents()
    exported = gguf.GGUFReader(to_gguf(tiny_chat_model_dir, tmp_path / "model.gguf", dtype="q8_0"))
    assert exported.fields["tokenizer.ggml.pre"].contents() == original == "smollm"


def _shape(symbols: tuple[str, ...], fields: dict, arch: str, n_tokens: int) -> tuple[int, ...]:
    head_dim = fields[f"{arch}.attention.key_length"]
    sizes = {"E": fields[f"{arch}.embedding_length"], "V": n_tokens, "F": fields[f"{arch}.feed_forward_length"],
             "Q": fields[f"{arch}.attention.head_count"] * head_dim, "D": head_dim,
             "K": fields[f"{arch}.attention.head_count_kv"] * head_dim,
             "R": fields[f"{arch}.rope.dimension_count"] // 2}
    return tuple(sizes[symbol] for symbol in symbols)


@pytest.mark.parametrize("family, dtype", [(family, "f16") for family in FAMILIES] + [("tied", "bf16"),
                                                                                     ("qwen3", "q8_0")])
def test_gguf_of_every_family_holds_only_what_llama_cpp_accepts(family, dtype, family_dirs, tmp_path):
    reader = gguf.GGUFReader(to_gguf(family_dirs[family], tmp_path / "model.gguf", dtype=dtype))
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    arch = fields["general.architecture"]
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == TOKENIZERS[FAMILIES[family]][1]
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
    (_split_then_bytes(_QWEN2_REGEX), True, "ignores BPE merges for words that are whole tokens"),
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
