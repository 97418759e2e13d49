"""Export: LoRA adapters merged into full HF dirs, and GGUF files written for llama.cpp.

The oracles are transformers (loads the merged dir, and reads our GGUF with its own GGUF loader), peft (runs the
adapter unmerged), and gguf's own reader.
"""
import json
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch

from hf_models import save_tiny_hf_model
from litllm.checkpoint import copy_tokenizer_files, load_model
from litllm.convert.from_gguf import from_gguf
from litllm.convert.merge_lora import merge_lora
from litllm.convert.to_gguf import to_gguf
from litllm.lora import LoRAConfig, apply_lora, lora_layers, save_adapter

TOKENS = torch.tensor([[1, 504, 3260, 314, 253, 1345, 28, 597, 314, 6615, 30, 2]])


@pytest.fixture(scope="module")
def adapter_dir(tiny_chat_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter with non-zero B on the tiny chat model (an untrained adapter would merge to a no-op)."""
    model = load_model(tiny_chat_model_dir)
    config = LoRAConfig(r=4, alpha=8, dropout=0.0)
    apply_lora(model, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(std=0.05)
    out = tmp_path_factory.mktemp("adapter") / "final"
    save_adapter(model, config, out, base_checkpoint=tiny_chat_model_dir)
    return out


def test_merged_dir_loads_in_transformers_with_the_adapter_models_logits(adapter_dir, tiny_chat_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = merge_lora(adapter_dir, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(TOKENS).logits
        expected = PeftModel.from_pretrained(base, adapter_dir).eval()(TOKENS).logits
        torch.testing.assert_close(merged(TOKENS).logits, expected, atol=1e-4, rtol=0)
    assert not torch.allclose(base_logits, expected, atol=1e-3)  # the adapter matters: the merge is no no-op
    assert AutoTokenizer.from_pretrained(out)("hello")["input_ids"] == \
        AutoTokenizer.from_pretrained(tiny_chat_model_dir)("hello")["input_ids"]
    assert (out / "generation_config.json").is_file()


def test_merge_lora_refuses_to_overwrite(adapter_dir, tmp_path):
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "keep.txt").write_text("mine")
    result = subprocess.run([sys.executable, "-m", "litllm", "convert", "merge_lora", str(adapter_dir),
                             "--out_dir", str(tmp_path / "merged")], capture_output=True, text=True)
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert "Traceback" not in result.stderr and (tmp_path / "merged" / "keep.txt").read_text() == "mine"


def test_qlora_adapter_merges_into_the_original_weights_and_says_so(adapter_dir, tmp_path, capsys):
    qlora = tmp_path / "qlora"
    qlora.mkdir()
    for file in adapter_dir.iterdir():
        (qlora / file.name).write_bytes(file.read_bytes())
    info = json.loads((qlora / "litllm.json").read_text())
    (qlora / "litllm.json").write_text(json.dumps({**info, "quantize": "bnb.nf4"}))
    merged = load_model(merge_lora(qlora, tmp_path / "merged"))
    assert "original full-precision weights" in capsys.readouterr().out
    reference = load_model(merge_lora(adapter_dir, tmp_path / "merged-plain"))
    for (name, a), (_, b) in zip(merged.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


@pytest.fixture(scope="module")
def llama_dir(tiny_chat_model_dir, tmp_path_factory) -> Path:
    """A tiny untied Llama (distinct output matrix, GQA) with SmolLM2's tokenizer; row sizes multiples of 32."""
    out = tmp_path_factory.mktemp("llama")
    save_tiny_hf_model("llama", out, vocab_size=49152, hidden_size=64, intermediate_size=128,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    copy_tokenizer_files(tiny_chat_model_dir, out)
    return out


def logits(checkpoint_dir: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_model(checkpoint_dir, dtype=torch.float32)(TOKENS)


@pytest.mark.parametrize("dtype, atol", [("f16", 1e-3), ("bf16", 2e-2), ("q8_0", 2e-2)])
def test_gguf_round_trip_gives_the_source_logits(llama_dir, tmp_path, dtype, atol):
    gguf_file = to_gguf(llama_dir, tmp_path / "model.gguf", dtype=dtype)
    expected = logits(llama_dir)
    actual = logits(from_gguf(gguf_file, tmp_path / "back"))
    # f16 rounds each weight to 11 significant bits; q8_0 to 8-bit blocks with an f16 scale
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def test_gguf_file_holds_tensors_metadata_tokenizer_and_chat_template(llama_dir, tmp_path):
    from litllm.tokenizer import Tokenizer

    reader = gguf.GGUFReader(to_gguf(llama_dir, tmp_path / "model.gguf", dtype="q8_0"))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    config = json.loads((llama_dir / "config.json").read_text())
    tokenizer = Tokenizer(llama_dir)
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == config["num_hidden_layers"]
    assert fields["llama.attention.head_count_kv"] == config["num_key_value_heads"]
    # the tokenizer.json from_gguf unpacked from SmolLM2's GGUF comes back under that file's name for its cut, "smollm"
    # (digits one by one), which llama.cpp knows
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "smollm"
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert fields["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert fields["tokenizer.ggml.token_type"][:2] == [gguf.TokenType.CONTROL] * 2
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_id
    assert len(fields["tokenizer.ggml.tokens"]) == config["vocab_size"]
    n_layers = config["num_hidden_layers"]
    assert len(tensors) == 3 + 9 * n_layers  # embed, norm, output + 9 per block
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert "output.weight" in tensors  # untied


def test_transformers_reads_our_gguf_with_the_same_logits(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    to_gguf(llama_dir, tmp_path / "model.gguf", dtype="f16")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits, logits(llama_dir), atol=1e-3, rtol=0)
    text = "Hello, 세계! 2024 tokens"
    assert AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")(text)["input_ids"] == \
        AutoTokenizer.from_pretrained(llama_dir)(text)["input_ids"]


def test_an_adapter_exports_merged(adapter_dir, tiny_chat_model_dir, tmp_path):
    gguf_file = to_gguf(adapter_dir, tmp_path / "adapter.gguf", dtype="f16")
    merged = merge_lora(adapter_dir, tmp_path / "merged")
    torch.testing.assert_close(logits(from_gguf(gguf_file, tmp_path / "back")), logits(merged), atol=1e-3, rtol=0)
