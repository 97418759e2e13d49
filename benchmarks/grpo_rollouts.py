"""GRPO rollout speed: G sampled answers per prompt from a LoRA policy, litllm's `sample_continuations` (the prompt
prefilled once, its G rows decoding together) against transformers + PEFT `generate(num_return_sequences=G)` (what
TRL's GRPOTrainer runs without vLLM), same checkpoint, adapter shape, prompts, dtype and machine.

    python benchmarks/grpo_rollouts.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

Every answer runs exactly --new_tokens tokens (no stop token), so both sides sample the same number. Prints one table
and appends it to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import append_results, machine

from litllm.checkpoint import load_model
from litllm.decode import sample_continuations
from litllm.lora import LoRAConfig, apply_lora
from litllm.tokenizer import Tokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def prompts(n: int) -> list[str]:
    rows = Path(__file__).parents[1] / "data" / "arithmetic_demo.jsonl"
    return [json.loads(line)["prompt"] for line in rows.read_text().splitlines()[:n]]


def time_litllm(model, prompt_ids: list[list[int]], g: int, new_tokens: int) -> float:
    start = time.perf_counter()
    for i, ids in enumerate(prompt_ids):
        sample_continuations(model, ids, g, new_tokens, temperature=1.0, generator=torch.Generator().manual_seed(i))
    return time.perf_counter() - start


@torch.inference_mode()
def time_transformers(model, prompt_ids: list[list[int]], g: int, new_tokens: int) -> float:
    start = time.perf_counter()
    for ids in prompt_ids:
        x = torch.tensor([ids])
        model.generate(x, attention_mask=torch.ones_like(x), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                       num_return_sequences=g, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint_dir", type=Path, default=Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"))
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--num_generations", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="best of N timed runs per side, alternating")
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ours = apply_lora(load_model(args.checkpoint_dir, dtype=torch.float32), LoRAConfig(r=8, alpha=16, dropout=0.0,
                                                                                        targets=TARGETS)).eval()
    hf = AutoModelForCausalLM.from_pretrained(args.checkpoint_dir, dtype=torch.float32)
    theirs = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)).eval()
    tokenizer = Tokenizer(args.checkpoint_dir)
    prompt_ids = [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in prompts(args.prompts)]
    time_litllm(ours, prompt_ids[:1], 2, 4), time_transformers(theirs, prompt_ids[:1], 2, 4)  # warm-up
    litllm_seconds, hf_seconds = [], []
    for _ in range(args.repeats):  # alternating, so a busy moment of the machine hits both sides
        litllm_seconds.append(time_litllm(ours, prompt_ids, args.num_generations, args.new_tokens))
        hf_seconds.append(time_transformers(theirs, prompt_ids, args.num_generations, args.new_tokens))
    tokens = args.prompts * args.num_generations * args.new_tokens
    ours_rate, theirs_rate = tokens / min(litllm_seconds), tokens / min(hf_seconds)
    table = ("| | tokens/s | ratio |\n|---|---|---|\n"
             f"| transformers + PEFT `generate(num_return_sequences={args.num_generations})` | {theirs_rate:.1f} | 1.00x |\n"
             f"| litllm `sample_continuations` | {ours_rate:.1f} | {ours_rate / theirs_rate:.2f}x |")
    print(table)
    append_results(
        f"GRPO rollouts, {args.checkpoint_dir.name}, LoRA r=8, {args.prompts} prompts x {args.num_generations} "
        f"answers x {args.new_tokens} tokens (issue 15)",
        f"python benchmarks/grpo_rollouts.py --checkpoint_dir {args.checkpoint_dir} --prompts {args.prompts} "
        f"--num_generations {args.num_generations} --new_tokens {args.new_tokens}", table,
        f"{machine()}; float32, temperature 1, no top-k/top-p, every answer exactly {args.new_tokens} tokens; best of "
        f"{args.repeats} alternating timed runs per side, one process. Unmerged LoRA on all seven linear layers on both "
        "sides (the policy as GRPO samples it).")


if __name__ == "__main__":
    main()
