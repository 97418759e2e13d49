"""Tiny random Hugging Face models of every family, saved with transformers' own save_pretrained."""
from pathlib import Path

import torch

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

FAMILIES = {
    "llama": dict(model_type="llama", rope_theta=10000.0),
    "llama3-rope": dict(model_type="llama", rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "llama-linear-rope": dict(model_type="llama", rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mistral-sliding": dict(model_type="mistral", sliding_window=5),
    "qwen2": dict(model_type="qwen2", rope_theta=1000000.0),
    "qwen2-yarn": dict(model_type="qwen2", rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen3": dict(model_type="qwen3", head_dim=24),
    "tied": dict(model_type="llama", tie_word_embeddings=True),
}


def save_tiny_hf_model(family: str, out_dir: Path, seed: int = 0, **overrides):
    """Save a random tiny model of `family` to out_dir and return the transformers model (float32, eval)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(TINY, **FAMILIES[family], **overrides)
    model_type = kwargs.pop("model_type")
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # non-trivial norms and biases, so a missed weight shows in the logits
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(out_dir)
    return model.eval()
