"""Pretraining from scratch and continued pretraining on plain text: a Lightning Fabric script.

    litllm pretrain --config config_hub/pretrain/llama-tiny.yaml
    litllm pretrain --model_name llama-tiny --tokenizer_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \
        --data.paths data/tiny_shakespeare.txt
    litllm pretrain --initial_checkpoint checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \
        --data.paths data/ko_nsmc_reviews.txt --lora.r 16 --train_embeddings true
    torchrun --nproc_per_node 8 -m litllm pretrain --config ... --devices 8 --strategy fsdp
    python pretrain.py --config llama-tiny.yaml      # after `litllm cp pretrain pretrain.py`

setup() builds Fabric, the model (a named config, or a Hugging Face checkpoint to continue, optionally with LoRA),
the token windows and the optimizer; fit() is the training loop and next_token_loss() the objective, both here to
edit. The mechanics they call (loss normalization across micro-batches and devices, checkpoints, resume,
validation) live in litllm.training.
Outputs: Hugging Face model dirs under out_dir (step-NNNNNN/ and final/), logs under out_dir/logs.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Literal

import lightning_fabric as L
import torch
import torch.nn as nn

from litllm.checkpoint import check_checkpoint_dir, copy_tokenizer_files, load_model, write_model_files
from litllm.config import Config
from litllm.data import TextCorpus, TrainingDataset
from litllm.decode import generate_tokens, inference_linears
from litllm.errors import UserError
from litllm.lora import LoRAConfig, apply_lora, count_parameters, load_adapter, merge_lora, save_adapter
from litllm.model import GPT
from litllm.tokenizer import Tokenizer
from litllm.training.args import LoggerName, OptimizerName, Strategy, TrainArgs
from litllm.training.fabric import (check_strategy, check_tensor_parallel, load_for_training, model_dtype,
                                    setup_fabric)
from litllm.training.loop import (StepLog, StepUnits, prepare_data, setup_training, step_batches,
                                  training_flops_per_token, validate)
from litllm.training.losses import count_targets, cross_entropy_sum, perplexity
from litllm.training.state import Checkpoints, Progress, prepare_out_dir


def setup(
    model_name: str | None = None,
    initial_checkpoint: Path | None = None,
    tokenizer_dir: Path | None = None,
    out_dir: Path = Path("out/pretrain"),
    data: TextCorpus = TextCorpus(),
    train: TrainArgs = TrainArgs(global_batch_size=64, micro_batch_size=8, max_seq_length=1024, lr=6e-4,
                                 min_lr=6e-5, warmup_steps=100, weight_decay=0.1, eval_interval=200,
                                 eval_max_batches=50),
    lora: LoRAConfig | None = None,
    train_embeddings: bool = False,
    devices: int = 1,
    num_nodes: int = 1,
    strategy: Strategy = "auto",
    tensor_parallel: int = 1,
    precision: str | None = None,
    optimizer: OptimizerName = "AdamW",
    logger: LoggerName = "csv",
    seed: int = 1337,
    resume: bool | Literal["auto"] = False,
    overwrite: bool = False,
    sample_prompt: str | None = None,
) -> Path:
    """Pretrain a model from scratch, or continue pretraining a checkpoint, on plain text.

    Args:
        model_name: train from scratch with this named architecture (litllm.config.NAMED_CONFIGS: llama-tiny,
            smollm2-135m, llama-3.2-1b).
        initial_checkpoint: continue pretraining this Hugging Face model dir instead.
        tokenizer_dir: the dir whose tokenizer files to use (default: initial_checkpoint's); needed from scratch.
            Its files are copied into every checkpoint, so each one is a complete Hugging Face model dir.
        out_dir: where checkpoints (HF model dirs with training state) and logs go.
        data: the text to train on.
        train: training loop settings; max_seq_length is the window length.
        lora: continued pretraining with low-rank adapters on a frozen base (e.g. --lora.r 16); the checkpoints
            are the merged model, with the adapter in an adapter/ subdir for resuming.
        train_embeddings: with lora, also train embed_tokens and lm_head in full (text in a new language or
            domain uses the vocabulary differently).
        devices: devices per node.
        num_nodes: nodes (machines); launch with torchrun, SLURM or `fabric run`.
        strategy: auto (one device); ddp (a replica of the model per device, each taking its share of every
            global batch); fsdp (as ddp, but each device holds only its shard of the weights, gradients and
            optimizer state; each transformer block is gathered just for its forward and backward).
        tensor_parallel: split each transformer block's weights over groups of this many devices (Megatron-style
            tensor parallelism; it must divide the devices and the model's heads and MLP width); the groups shard
            with FSDP. 1: no splitting. Tested on CPU; see tutorials/pretrain.md.
        precision: Fabric precision: 32-true, bf16-mixed, bf16-true, 16-mixed (default: bf16-true on GPU, 32-true on CPU).
        optimizer: AdamW, or AdamW8bit from bitsandbytes.
        logger: where metrics go besides the terminal: csv, tensorboard or wandb.
        seed: random seed of the run: data order, new weights and adapters, dropout.
        resume: "auto" continues from the newest complete checkpoint in out_dir if there is one; true requires one.
        overwrite: start over in an out_dir that holds a run, deleting its checkpoints and logs (nothing else).
        sample_prompt: after training, print a sampled continuation of this text from the final checkpoint.
    """
    if (model_name is None) == (initial_checkpoint is None):
        raise UserError("pass either --model_name NAME (from scratch) or --initial_checkpoint DIR (continued)")
    if model_name and lora:
        raise UserError("--lora adapts a pretrained model; use it with --initial_checkpoint, not --model_name")
    if train_embeddings and not lora:
        raise UserError("--train_embeddings true goes with --lora (without LoRA every weight trains anyway)")
    if train_embeddings and "lm_head" in lora.targets:
        raise UserError("--train_embeddings true trains lm_head in full; remove lm_head from --lora.targets")
    if initial_checkpoint is not None:
        initial_checkpoint = check_checkpoint_dir(initial_checkpoint)
    tokenizer_dir = tokenizer_dir or initial_checkpoint
    if tokenizer_dir is None:
        raise UserError("--model_name needs --tokenizer_dir DIR (a dir with tokenizer.json or tokenizer.model)")
    check_strategy(strategy, optimizer)
    if tensor_parallel > 1 and lora:
        raise UserError("--tensor_parallel does not split LoRA adapters yet; continue pretraining with --lora on "
                        "--strategy fsdp, or train every weight with --tensor_parallel")
    check_tensor_parallel(Config.from_name(model_name) if model_name else Config.from_hf(initial_checkpoint),
                          tensor_parallel, devices * num_nodes, strategy)
    fabric = setup_fabric(out_dir, precision, logger, devices, num_nodes, strategy, tensor_parallel)
    resume_from = prepare_out_dir(fabric, out_dir, resume, overwrite,
                                  inputs=[initial_checkpoint, tokenizer_dir, *data.sources()])
    fabric.seed_everything(seed)

    tokenizer = Tokenizer(tokenizer_dir)
    train_data, val_data = prepare_data(fabric, data, tokenizer, train.max_seq_length)

    if model_name:
        model = new_model(fabric, model_name, tokenizer, resume_from)
    else:
        if lora:
            model = load_model(initial_checkpoint, dtype=model_dtype(fabric), device=fabric.device)
        else:  # under FSDP each process reads only its shards
            model = load_for_training(fabric, resume_from or initial_checkpoint)
        check_vocabulary(model, tokenizer)
        if lora:
            lora = add_adapters(model, lora, train_embeddings, resume_from, fabric)
    if train.max_seq_length > model.config.max_seq_len:
        raise UserError(f"--train.max_seq_length {train.max_seq_length} is longer than the model's context "
                        f"({model.config.max_seq_len})")
    fabric.print(f"Parameters: {count_parameters(model, trainable=False):,} ({count_parameters(model):,} trainable)")
    flops_per_token = training_flops_per_token(model, train.max_seq_length)
    model, optim, scheduler, progress = setup_training(fabric, model, optimizer, train,
                                                       train.total_steps(len(train_data)), resume_from)

    def save_weights(directory: Path, trained: nn.Module) -> None:
        if lora:  # a complete HF model dir, which `litllm finetune` and transformers read as is
            write_model_files(merge_lora(copy.deepcopy(trained)), directory)
            save_adapter(trained, lora, directory / "adapter", base_checkpoint=initial_checkpoint)
        else:
            write_model_files(trained, directory)
        copy_tokenizer_files(tokenizer_dir, directory)

    with Checkpoints(fabric, out_dir, save_weights, train) as checkpoints:
        fit(fabric, model, optim, scheduler, progress, train_data, val_data, train, seed, checkpoints, flops_per_token)
    final = out_dir / "final"
    if sample_prompt is not None and fabric.global_rank == 0:
        print_sample(final, tokenizer, sample_prompt, fabric.device, seed)
    fabric.print(f"Saved the model to {final}\nTry it: litllm generate {final} --prompt \"...\"")
    return final


def next_token_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
    """The objective: cross-entropy of every token of the window after the first, summed.

    Summed rather than averaged, so StepUnits can make a step's gradient the mean over all of its target tokens.
    """
    hidden = model(batch["input_ids"], return_hidden=True)  # (B, T, hidden_size)
    return cross_entropy_sum(model.lm_head, hidden, batch["labels"], chunk_size)


def fit(fabric: L.Fabric, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, progress: Progress,
        train_data: TrainingDataset, val_data: TrainingDataset, args: TrainArgs, seed: int, checkpoints: Checkpoints,
        flops_per_token: float) -> None:
    """The training loop: per optimizer step, forward and backward over this device's micro-batches, then one
    optimizer step; log (with MFU on GPUs), validate and save at their intervals, and save `final` at the end."""
    total_steps = args.total_steps(len(train_data))
    log = StepLog(fabric, args, total_steps, progress.step, flops_per_token)

    def objective(model, batch):  # validation's view of the loss: (summed loss, summed metrics)
        return next_token_loss(model, batch, args.loss_chunk_size), {}

    def evaluate() -> dict[str, float]:
        metrics = validate(fabric, model, val_data, args, objective, count_targets)
        metrics["val_ppl"] = perplexity(metrics["val_loss"])  # exp of the mean token cross-entropy
        fabric.print(f"step {progress.step}: val loss {metrics['val_loss']:.4f}, "
                     f"val perplexity {metrics['val_ppl']:.2f}")
        return metrics

    if progress.step == 0 and len(val_data):  # the starting point, to compare the end with
        log.log(0, evaluate())
    batches = step_batches(train_data, args, seed, progress, fabric)
    while progress.step < total_steps:
        micro_batches = next(batches)
        started = time.perf_counter()
        units = StepUnits(fabric, sum(count_targets(batch) for batch in micro_batches))
        loss_sum = torch.zeros((), device=fabric.device)
        for i, batch in enumerate(micro_batches):
            batch = fabric.to_device(batch)
            # gradients sync across devices on the last micro-batch only (DDP decides in forward, FSDP in backward)
            with fabric.no_backward_sync(model, enabled=i < len(micro_batches) - 1):
                with fabric.autocast():
                    loss = next_token_loss(model, batch, args.loss_chunk_size)
                fabric.backward(loss * units.loss_scale)
            loss_sum += loss.detach()
        if args.grad_clip is not None:
            fabric.clip_gradients(model, optimizer, max_norm=args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        progress.step += 1

        metrics = {**units.mean({"loss": loss_sum}), "lr": scheduler.get_last_lr()[0]}
        seconds = time.perf_counter() - started
        if len(val_data) and args.is_eval_step(progress.step, total_steps):
            metrics |= evaluate()
        log.step(progress.step, metrics, tokens=sum(b["input_ids"].numel() for b in micro_batches), seconds=seconds)
        # every --train.save_interval steps, and at once when the run is told to stop (SIGTERM, Ctrl-C)
        checkpoints.after_step(model, optimizer, scheduler, progress, total_steps)
    log.close()
    checkpoints.save_final(model, optimizer, scheduler, progress)


def new_model(fabric, model_name: str, tokenizer: Tokenizer, resume_from: Path | None) -> GPT:
    """A randomly initialized model of a named config, or the one being resumed."""
    if resume_from:
        return load_model(resume_from, dtype=model_dtype(fabric), device=fabric.device)
    # the tokenizer's special tokens go into config.json, so generation stops at EOS
    config = Config.from_name(model_name, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                              pad_token_id=tokenizer.pad_id)
    with fabric.init_module():  # on the device, in the training dtype; same weights on every rank (same seed)
        model = GPT(config)
    check_vocabulary(model, tokenizer)
    return model


def check_vocabulary(model: GPT, tokenizer: Tokenizer) -> None:
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"the tokenizer in {tokenizer.checkpoint_dir} has {tokenizer.vocab_size:,} tokens but the "
                        f"model's vocabulary holds {model.config.vocab_size:,}; use the model's own tokenizer")


def add_adapters(model: GPT, lora: LoRAConfig, train_embeddings: bool, resume_from: Path | None,
                 fabric) -> LoRAConfig:
    """LoRA on the frozen base (the saved adapter when resuming), and optionally trainable embeddings."""
    if resume_from:
        lora = load_adapter(model, resume_from / "adapter")
    else:
        apply_lora(model, lora)
    if train_embeddings:
        if resume_from:  # the trained embeddings are in the checkpoint's merged weights; nothing else is merged
            trained = load_model(resume_from, dtype=model_dtype(fabric), device=fabric.device)
            with torch.no_grad():
                model.embed_tokens.weight.copy_(trained.embed_tokens.weight)
                model.lm_head.weight.copy_(trained.lm_head.weight)
        # with tied embeddings these are one tensor
        model.embed_tokens.weight.requires_grad = model.lm_head.weight.requires_grad = True
    return lora


def print_sample(checkpoint: Path, tokenizer: Tokenizer, prompt: str, device: torch.device, seed: int) -> None:
    """A sampled continuation of `prompt` from the saved checkpoint (which also shows that it loads)."""
    model = load_model(checkpoint, dtype=torch.float32, device=device)
    inference_linears(model)  # on CPU: one-row products over all threads (a no-op elsewhere)
    ids = generate_tokens(model, tokenizer.encode(prompt, add_special_tokens=False), max_new_tokens=100,
                          temperature=0.8, top_k=50, stop_ids=tokenizer.stop_ids, seed=seed)
    print(f"Sample:\n{prompt}{tokenizer.decode(list(ids), skip_special_tokens=True)}")


if __name__ == "__main__":
    from litllm.cli import run

    run(setup)
