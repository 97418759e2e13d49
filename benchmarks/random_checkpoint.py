"""A random-weight Hugging Face checkpoint of a real model's shape, with that model's real tokenizer: for speed and
memory runs where the trained weights cannot go (a GPU machine that cannot reach the hub or take a 100 MB file).

    python benchmarks/random_checkpoint.py --like checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --out /tmp/m135
    python benchmarks/random_checkpoint.py --like DIR --out /tmp/m1700 --shape smollm2-1.7b

Tokens/s and memory are those of trained weights of the shape; losses start near ln(vocab size). Every token's
embedding is drawn, the padding token's too (see below). --like is any
Llama-family checkpoint dir (config.json and tokenizer files; its weights are not read); --shape replaces its sizes
with another model's of the same vocabulary. Weights are made on the GPU when there is one, saved in bfloat16.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

# the sizes that differ from SmolLM2-135M's in its larger siblings (same tokenizer, same vocabulary)
SHAPES = {
    "like": {},
    "smollm2-360m": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15,
                     "num_key_value_heads": 5},
    "smollm2-1.7b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                     "num_attention_heads": 32, "num_key_value_heads": 32, "rope_theta": 130000.0},
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                   "tokenizer.model", "special_tokens_map.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--like", type=Path, required=True, help="checkpoint dir whose config and tokenizer to use")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shape", choices=SHAPES, default="like")
    args = parser.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    if args.out.exists():
        raise SystemExit(f"{args.out} exists: choose another --out (nothing is overwritten)")
    sizes = {**json.loads((args.like / "config.json").read_text()), **SHAPES[args.shape]}
    sizes["head_dim"] = sizes["hidden_size"] // sizes["num_attention_heads"] if args.shape != "like" else \
        sizes.get("head_dim")
    config = AutoConfig.for_model(**sizes)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
        # transformers zeroes the padding token's embedding row; a sequence starting with that token (SmolLM2's pad is
        # <|im_end|>, common in chat data) then has an all-zero residual stream at position 0, and RMSNorm's backward
        # at zero (1 / sqrt(eps) per norm) sends its gradient to inf within a few layers: NaN losses with a frozen
        # embedding (LoRA, litllm's and PEFT's alike), which trained weights never show
        embedding = model.get_input_embeddings().weight
        with torch.no_grad():
            zero_rows = embedding.abs().sum(-1) == 0
            embedding[zero_rows] = torch.randn_like(embedding[zero_rows]) * config.initializer_range
    model.save_pretrained(args.out)
    for name in TOKENIZER_FILES:
        if (args.like / name).exists():
            shutil.copy(args.like / name, args.out / name)
    print(f"{args.out}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, random, {args.shape}")


if __name__ == "__main__":
    main()
