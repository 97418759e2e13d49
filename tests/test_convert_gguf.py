"""GGUF import: the Hugging Face directory `from_gguf` writes is the model and tokenizer in the GGUF.

References are transformers' own GGUF loading (`from_pretrained(dir, gguf_file=...)`) of the real
SmolLM2 file, and tiny random models of each family written to GGUF the way llama.cpp's converter does.
"""
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import pre_tokenizers

from hf_models import save_tiny_hf_model
from litllm.convert.from_gguf import from_gguf
from litllm.errors import UserError

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "안녕하세요, 만나서 반갑습니다. 오늘 날씨가 좋네요.",
    "Digits: 0 7 42 1234567890 3.14159 -273.15",
    "spaces  and   runs    of\tTabs\t\tand\nnewlines\n\n\n  indented\r\n end  ",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>mixed<file_sep>special<|im_end|>tokens",
    "emoji 🤗 and accents: déjà vu, naïve café",
]
PROMPTS = [
    "The capital of France is",
    "한국의 수도는",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def smollm2_tokenizers(smollm2_gguf, smollm2_dir):
    """(ours, reference): our directory's tokenizer and the one transformers builds from the GGUF."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    return AutoTokenizer.from_pretrained(smollm2_dir), reference


@torch.no_grad()
def test_imported_smollm2_logits_equal_transformers_gguf_loading(smollm2_gguf, smollm2_dir, smollm2_tokenizers):
    from transformers import AutoModelForCausalLM

    _, reference_tokenizer = smollm2_tokenizers
    ours = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    for prompt in PROMPTS:
        ids = reference_tokenizer(prompt, return_tensors="pt").input_ids
        expected, actual = reference(ids).logits, ours(ids).logits
        max_diff = (actual - expected).abs().max().item()
        print(f"max |logit difference| {max_diff:.2e} on {prompt!r}")
        assert max_diff < 1e-4


@pytest.mark.parametrize("text", TEXTS)
def test_imported_tokenizer_encodes_like_transformers_gguf_tokenizer(smollm2_tokenizers, text):
    ours, reference = smollm2_tokenizers
    ids = ours(text).input_ids
    assert ids == reference(text).input_ids
    assert ours.decode(ids) == reference.decode(ids) == text
    assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)


def test_imported_tokenizer_has_the_gguf_special_tokens_and_chat_template(smollm2_tokenizers, smollm2_dir):
    ours, reference = smollm2_tokenizers
    for name in ["bos_token", "eos_token", "pad_token", "unk_token", "add_bos_token", "all_special_tokens"]:
        assert getattr(ours, name) == getattr(reference, name), name
    assert (ours.bos_token, ours.eos_token, ours.add_bos_token) == ("<|im_start|>", "<|im_end|>", False)
    messages = [{"role": "user", "content": "안녕! What is 2 + 2?"}]
    for kwargs in [dict(tokenize=False), dict(tokenize=True, return_dict=False)]:
        expected = reference.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
        assert ours.apply_chat_template(messages, add_generation_prompt=True, **kwargs) == expected
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def llama_cpp_permute(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`: q/k rows into its interleaved RoPE order."""
    halves = weights.reshape(n_heads, 2, weights.shape[0] // n_heads // 2, *weights.shape[1:])
    return halves.swapaxes(1, 2).reshape(weights.shape)


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.generate_extra_tensors`: the `rope_freqs` tensor."""
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    old_context, low, high = rope["original_max_position_embeddings"], rope["low_freq_factor"], rope["high_freq_factor"]
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(rope["factor"])
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def byte_level_vocabulary(size: int) -> dict:
    others = sorted(set(pre_tokenizers.ByteLevel.alphabet()) - {"Ġ", "t"})
    tokens = ["Ġ", "t", "Ġt"] + others[: size - 4] + ["<|endoftext|>"]
    end = size - 1  # <|endoftext|>, a control token
    return dict(model="gpt2", tokens=tokens, token_types=[1] * end + [3], merges=["Ġ t"], bos=end, eos=end)


def write_gguf(model, path: Path, arch: str, vocabulary: dict) -> Path:
    """Write a transformers model as llama.cpp's converter does, in float32: its metadata keys, gguf's own
    tensor-name table, the q/k row permutation of "llama" and the `rope_freqs` tensor of Llama 3 RoPE."""
    config = model.config
    rope = config.rope_parameters
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(path, arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope["rope_theta"])
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    else:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope["rope_type"] in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope["rope_type"]))
        writer.add_rope_scaling_factor(rope["factor"])
    if rope["rope_type"] == "yarn":
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])

    writer.add_tokenizer_model(vocabulary["model"])
    writer.add_token_list(vocabulary["tokens"])
    writer.add_token_types(vocabulary["token_types"])
    if "merges" in vocabulary:
        writer.add_token_merges(vocabulary["merges"])
    if "scores" in vocabulary:
        writer.add_token_scores(vocabulary["scores"])
    writer.add_bos_token_id(vocabulary["bos"])
    writer.add_eos_token_id(vocabulary["eos"])

    names = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        weights = tensor.numpy()
        if arch == "llama" and ".q_proj." in name:
            weights = llama_cpp_permute(weights, config.num_attention_heads)
        if arch == "llama" and ".k_proj." in name:
            weights = llama_cpp_permute(weights, config.num_key_value_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), weights)
    if rope["rope_type"] == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(rope, head_dim))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    "family, arch",
    [("llama", "llama"), ("tied", "llama"), ("llama-linear-rope", "llama"), ("qwen2", "qwen2"),
     ("qwen2-yarn", "qwen2"), ("qwen3", "qwen3")],
)
@torch.no_grad()
def test_gguf_written_by_llama_cpp_rules_imports_with_the_same_logits(family, arch, tmp_path):
    from transformers import AutoModelForCausalLM

    reference = save_tiny_hf_model(family, tmp_path / "original")
    gguf_file = write_gguf(reference, tmp_path / "model.gguf", arch, byte_level_vocabulary(128))
    imported = AutoModelForCausalLM.from_pretrained(from_gguf(gguf_file, tmp_path / "imported"), dtype=torch.float32)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(imported(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)


@torch.no_grad()
def test_llama3_rope_scaling_is_recovered_from_rope_freqs(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    import hf_models

    # head_dim 32 and theta 10000 put several frequencies between the two wavelength boundaries
    rope_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64}
    monkeypatch.setitem(hf_models.FAMILIES, "llama3-dense-rope", dict(
        model_type="llama", hidden_size=64, num_attention_heads=2, num_key_value_heads=1, rope_theta=10000.0,
        rope_scaling=dict(rope_scaling)))
    reference = save_tiny_hf_model("llama3-dense-rope", tmp_path / "original")
    gguf_file = write_gguf(reference, tmp_path / "model.gguf", "llama", byte_level_vocabulary(128))
    out_dir = from_gguf(gguf_file, tmp_path / "imported")
    config = json.loads((out_dir / "config.json").read_text())
    assert config["rope_scaling"] == rope_scaling
    imported = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    ids = torch.randint(0, 128, (2, 80), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(imported(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)


def test_sentencepiece_vocabulary_encodes_like_transformers_gguf_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "he", "ll", "llo", "hello", "▁hello", "▁w", "or",
              "wor", "world", "▁world", "▁the", "the", "th", "▁t", "t"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<think>"]
    vocabulary = dict(
        model="llama", tokens=tokens, token_types=[2, 3, 3] + [6] * 256 + [1] * len(pieces) + [4],
        scores=[0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0], bos=1, eos=2,
    )
    model = save_tiny_hf_model("llama", tmp_path / "original")
    gguf_file = write_gguf(model, tmp_path / "model.gguf", "llama", vocabulary)
    ours = AutoTokenizer.from_pretrained(from_gguf(gguf_file, tmp_path / "imported"))
    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    for text in ["hello world", " hello  the world\n", "Hello wörld 안녕 <think>the</think>", "<s>hello</s><unk>"]:
        assert ours(text).input_ids == reference(text).input_ids, text
        assert ours.decode(ours(text).input_ids) == reference.decode(reference(text).input_ids)
    assert ours("hello").input_ids[0] == 1  # llama.cpp adds BOS to a sentencepiece vocabulary by default


def test_refuses_to_overwrite_a_non_empty_out_dir(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match=r"out already exists; pass --overwrite true"):
        from_gguf(tmp_path / "model.gguf", out_dir)
    with pytest.raises(UserError, match=r"out holds what litllm did not write there \(keep.txt\)"):
        from_gguf(tmp_path / "model.gguf", out_dir, overwrite=True)
    assert (out_dir / "keep.txt").read_text() == "mine"


def test_overwrite_true_replaces_a_model_dir(tmp_path):
    gguf_file = write_gguf(save_tiny_hf_model("llama", tmp_path / "original"), tmp_path / "model.gguf", "llama",
                           byte_level_vocabulary(128))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "model-00001-of-00002.safetensors").write_text("an older, sharded import")
    from_gguf(gguf_file, out_dir, overwrite=True)
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "original", "out"]  # no temp dirs left


def test_missing_gguf_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found: .*missing.gguf"):
        from_gguf(tmp_path / "missing.gguf", tmp_path / "out")


def test_a_gguf_without_a_model_in_it_is_a_user_error(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "vocabulary-only.gguf", "llama")
    writer.add_token_list(["a", "b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="no token_embd.weight tensor; not a model file"):
        from_gguf(tmp_path / "vocabulary-only.gguf", tmp_path / "out")


def test_unknown_architecture_is_a_user_error(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "mamba.gguf", "mamba")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="architecture 'mamba' is not supported"):
        from_gguf(tmp_path / "mamba.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _hostile_files(smollm2_gguf: Path) -> dict[str, bytes]:
    head = smollm2_gguf.open("rb").read(5000)
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)  # version 3, no tensors, one metadata entry
    return {
        "not GGUF": b"PK\x03\x04 a zip file, not a model\n",
        "empty": b"",
        "header only": head[:24],
        "truncated in the metadata": head,
        # 49 bytes: one entry, an array of 2^40 uint8 items, none of them present
        "huge array count": header + struct.pack("<Q", 5) + b"a.key" + struct.pack("<IIQ", 9, 0, 2**40),
        "huge string length": header + struct.pack("<Q", 2**62),
        "huge entry count": b"GGUF" + struct.pack("<IQQ", 3, 0, 2**63),
    }


@pytest.fixture(scope="module")
def truncated_in_the_weights(smollm2_gguf, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hostile") / "half.gguf"
    with smollm2_gguf.open("rb") as f:
        path.write_bytes(f.read(smollm2_gguf.stat().st_size // 2))
    return path


@pytest.mark.parametrize("kind", ["not GGUF", "empty", "header only", "truncated in the metadata", "huge array count",
                                  "huge string length", "huge entry count"])
def test_a_hostile_gguf_is_refused_at_once(kind, smollm2_gguf, tmp_path):
    (tmp_path / "model.gguf").write_bytes(_hostile_files(smollm2_gguf)[kind])
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"model\.gguf: (not a GGUF file|damaged or truncated GGUF file)"):
        from_gguf(tmp_path / "model.gguf", tmp_path / "out")
    assert time.perf_counter() - start < 5
    assert not (tmp_path / "out").exists()


def test_a_gguf_truncated_in_the_weights_is_refused_before_dequantizing(truncated_in_the_weights, tmp_path):
    with pytest.raises(UserError, match=r"damaged or truncated GGUF file: the \d+ bytes of tensor 'blk\..*' run past"):
        from_gguf(truncated_in_the_weights, tmp_path / "out")


def test_the_cli_refuses_a_hostile_gguf_in_one_line_with_exit_code_2(smollm2_gguf, tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(_hostile_files(smollm2_gguf)["huge array count"])
    # the timeout guards against the reader's endless loop on the huge count this check exists to prevent
    result = subprocess.run([sys.executable, "-m", "litllm", "convert", "from_gguf", str(path),
                             "--out_dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.strip().count("\n") == 0
    assert "Traceback" not in result.stderr
