"""LoRA fine-tuning (QLoRA with --quantize bnb.nf4): a Lightning Fabric script.

    litllm finetune lora checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --data JSON --data.json_path my.jsonl
    python lora.py --config lora.yaml      # after `litllm cp finetune/lora lora.py`

setup() builds Fabric, the model with adapters, the data and the optimizer; training.fit() is the loop.
Outputs: PEFT adapter dirs under out_dir (step-NNNNNN/ and final/), logs under out_dir/logs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from litllm.checkpoint import check_checkpoint_dir, copy_tokenizer_files, load_model
from litllm.data import Alpaca, SFTData
from litllm.lora import LoRAConfig, apply_lora, count_parameters, load_adapter, save_adapter
from litllm.quantize import quantize_model
from litllm.model import GPT
from litllm.tokenizer import Tokenizer
from litllm.training import (TrainArgs, check_strategy, fit, model_dtype, prepare_data, prepare_out_dir,
                             setup_fabric, setup_training)


def setup(
    checkpoint_dir: Path,
    out_dir: Path = Path("out/finetune/lora"),
    data: SFTData | None = None,
    train: TrainArgs = TrainArgs(),
    lora: LoRAConfig = LoRAConfig(),
    quantize: Literal["bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.int8"] | None = None,
    devices: int = 1,
    num_nodes: int = 1,
    strategy: Literal["auto", "ddp", "fsdp"] = "auto",
    precision: str | None = None,
    optimizer: Literal["AdamW", "AdamW8bit"] = "AdamW",
    logger: Literal["csv", "tensorboard", "wandb"] = "csv",
    seed: int = 1337,
    resume: bool | Literal["auto"] = False,
    overwrite: bool = False,
) -> Path:
    """Fine-tune low-rank adapters on a frozen (optionally 4-bit) base model.

    Args:
        checkpoint_dir: the Hugging Face model dir to adapt.
        out_dir: where adapters, training state and logs go.
        data: the fine-tuning data (default: Alpaca from the hub).
        train: training loop settings.
        lora: adapter settings.
        quantize: store the frozen base weights in 4 or 8 bits with bitsandbytes (QLoRA).
        devices: devices per node.
        num_nodes: nodes (machines); launch with torchrun, SLURM or `fabric run`.
        strategy: auto (one device); ddp (a replica of the model per device, each taking its share of every
            global batch); fsdp (as ddp, but each device holds only its shard of the weights, gradients and
            optimizer state; each transformer block is gathered just for its forward and backward).
        precision: Fabric precision: 32-true, bf16-mixed, bf16-true, 16-mixed (default: bf16-true on GPU, 32-true on CPU).
        optimizer: AdamW, or AdamW8bit from bitsandbytes.
        logger: where metrics go besides the terminal: csv, tensorboard or wandb.
        seed: random seed (data order, adapter init, dropout).
        resume: "auto" continues from the newest complete checkpoint in out_dir if there is one; true requires one.
        overwrite: delete an existing out_dir and start over.
    """
    checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
    check_strategy(strategy, optimizer, quantize)
    resume_from = prepare_out_dir(out_dir, resume, overwrite)
    fabric = setup_fabric(out_dir, precision, logger, devices, num_nodes, strategy)
    fabric.seed_everything(seed)

    tokenizer = Tokenizer(checkpoint_dir)
    train_data, val_data = prepare_data(fabric, data or Alpaca(), tokenizer, train.max_seq_length)

    model = load_model(checkpoint_dir, dtype=model_dtype(fabric), device=fabric.device)
    if quantize:
        model = quantize_model(model, quantize)
    if resume_from:
        lora = load_adapter(model, resume_from)
    else:
        apply_lora(model, lora)
    fabric.print(f"Trainable parameters: {count_parameters(model):,} of {count_parameters(model, trainable=False):,}")
    model, optim, scheduler, progress = setup_training(fabric, model, optimizer, train, len(train_data), resume_from)

    def save_weights(directory: Path, trained: GPT) -> None:
        save_adapter(trained, lora, directory, base_checkpoint=checkpoint_dir, quantize=quantize)
        copy_tokenizer_files(checkpoint_dir, directory)

    fit(fabric, model, optim, scheduler, train_data, val_data, train, seed, out_dir, save_weights, progress)
    final = out_dir / "final"
    fabric.print(f"Saved the adapter to {final}\nTry it: litllm chat {checkpoint_dir} --adapter {final}")
    return final


if __name__ == "__main__":
    from litllm.cli import run

    run(setup)
