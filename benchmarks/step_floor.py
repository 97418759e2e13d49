"""The fastest a fine-tuning step can run here: its matrix products and attention alone, each timed at its own shape.

A LoRA or full fine-tuning step of a Llama-shaped model is mostly matrix products: per linear layer a forward product
and one for its input's gradient (plus one for its weight's gradient in full fine-tuning), the same for the output
layer, LoRA's rank-r products, and attention. This script times each distinct product on its own (best of a few runs,
at the step's precision), adds them up by how often a step makes them, adds causal attention's forward and backward
(litllm's, the fastest measured), and prints the step time this leaves: a ceiling on tokens/s that no implementation
of the same step in PyTorch passes here. Against it, the tokens/s of benchmarks/finetune_lora.py say how far each side
is from this machine's hardware, and which of issue 13's ratios the hardware allows at all.

Usage: python benchmarks/step_floor.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
"""
from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import torch
from common import append_results, machine, too_slow_here

from litllm.config import Config
from litllm.model import causal_attention


def best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN/MKL pick and cache their kernels
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def step_products(config: Config, tokens: int, mode: str, rank: int) -> Counter:
    """(rows, inner, columns) of every matrix product a step makes, counted: forward, input gradient, and (full) weight
    gradient for each linear layer and the output layer; LoRA's A and B forward and backward. In LoRA the first block's
    q, k and v make no input gradient: their input, the frozen embeddings' output, wants none."""
    attention_input = [(config.hidden_size, config.n_heads * config.head_dim),
                       (config.hidden_size, config.n_kv_heads * config.head_dim),
                       (config.hidden_size, config.n_kv_heads * config.head_dim)]
    others = [(config.n_heads * config.head_dim, config.hidden_size),
              (config.hidden_size, config.intermediate_size),
              (config.hidden_size, config.intermediate_size),
              (config.intermediate_size, config.hidden_size)]
    products: Counter = Counter()
    for index, (fan_in, fan_out) in enumerate(attention_input + others):
        with_input_gradient = config.n_layers - (mode == "lora" and index < len(attention_input))
        products[(tokens, fan_in, fan_out)] += config.n_layers  # forward
        products[(tokens, fan_out, fan_in)] += with_input_gradient
        if mode == "full":
            products[(fan_out, tokens, fan_in)] += config.n_layers  # weight gradient
        else:
            for shape in ((tokens, fan_in, rank), (tokens, rank, fan_out),  # forward: x A^T, then B
                          (fan_out, tokens, rank), (rank, tokens, fan_in)):  # B's and A's gradients
                products[shape] += config.n_layers
            products[(tokens, fan_out, rank)] += with_input_gradient  # input gradient through B, then A
            products[(tokens, rank, fan_in)] += with_input_gradient
    vocab, hidden = config.vocab_size, config.hidden_size
    products[(tokens, hidden, vocab)] += 1
    products[(tokens, vocab, hidden)] += 1
    if mode == "full":
        products[(vocab, tokens, hidden)] += 1
    return products


def product_seconds(shape: tuple[int, int, int], dtype: torch.dtype, repeats: int) -> float:
    rows, inner, columns = shape
    a, b = torch.randn(rows, inner, dtype=dtype), torch.randn(inner, columns, dtype=dtype)
    return best_seconds(lambda: a @ b, repeats)


def attention_seconds(config: Config, batch_size: int, seq_len: int, dtype: torch.dtype, repeats: int) -> float:
    q = torch.randn(batch_size, config.n_heads, seq_len, config.head_dim, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(batch_size, config.n_kv_heads, seq_len, config.head_dim, dtype=dtype, requires_grad=True)
            for _ in range(2))
    grad = torch.randn_like(q)
    return best_seconds(lambda: causal_attention(q, k, v).backward(grad), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint_dir", type=Path, default=Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"))
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--precisions", default="32-true,bf16-mixed")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="best of N timings per product")
    parser.add_argument("--no_append", action="store_true", help="print the table, leave RESULTS.md alone")
    args = parser.parse_args()

    config = Config.from_hf(args.checkpoint_dir)
    tokens = args.batch_size * args.seq_len
    rows = []
    for precision in args.precisions.split(","):
        dtype = torch.float32 if precision == "32-true" else torch.bfloat16  # bf16-mixed: products under autocast
        if reason := too_slow_here(dtype):
            print(reason)
            continue
        timed: dict = {}
        attention = config.n_layers * attention_seconds(config, args.batch_size, args.seq_len, dtype, args.repeats)
        for mode in args.modes.split(","):
            products = step_products(config, tokens, mode, args.rank)
            for shape in products.keys() - timed.keys():
                timed[shape] = product_seconds(shape, dtype, args.repeats)
            flops = sum(2 * r * i * c * n for (r, i, c), n in products.items())
            seconds = sum(timed[shape] * n for shape, n in products.items())
            step = seconds + attention
            rows.append(f"| {mode} | {precision} | {flops / 1e9:.1f} | {flops / seconds / 1e9:.0f} | {seconds:.2f} | "
                        f"{attention:.2f} | {step:.2f} | {tokens / step:.1f} |")
            print(rows[-1], flush=True)

    header = ("| mode | precision | product GFLOP a step | GFLOP/s | products s | attention s | step floor s "
              "| ceiling tok/s |")
    table = "\n".join([header, "|---|---|---|---|---|---|---|---|", *rows])
    notes = (f"{machine()}; {args.batch_size} x {args.seq_len} tokens, LoRA r={args.rank} on all seven linear layers "
             f"of each block. Each product timed alone at its shape (best of {args.repeats}), summed by how often a "
             "step makes it; attention is litllm's causal attention, forward and backward, per layer; bf16-mixed "
             "runs both in bfloat16, as autocast does. Not counted: norms, activations, casts, the loss, the "
             "optimizer.")
    print(table)
    if not args.no_append:
        command = "python benchmarks/step_floor.py --checkpoint_dir " + str(args.checkpoint_dir)
        append_results(f"Step floor: products and attention alone, {args.checkpoint_dir.name}, batch "
                       f"{args.batch_size} x {args.seq_len} tokens", command, table, notes)


if __name__ == "__main__":
    main()
