"""Fabric for a training run: precision, devices, strategy (one device, DDP, FSDP) and the metrics logger."""
from __future__ import annotations

import copy
import importlib.util
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, get_args

import lightning_fabric as L
import torch
import torch.nn as nn
from safetensors import safe_open
from lightning_fabric.loggers import Logger
from lightning_fabric.strategies import ModelParallelStrategy
from lightning_fabric.utilities.rank_zero import rank_zero_only

from litllm.checkpoint import load_model, warn_if_slow_on_cpu, weight_sources
from litllm.config import Config
from litllm.errors import UserError
from litllm.memory import keep_freed_memory
from litllm.model import GPT
from litllm.rope import rope_frequencies
from litllm.training.args import LoggerName, OptimizerName, Strategy



def default_precision() -> str:
    if torch.cuda.is_available():
        return "bf16-true" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def check_strategy(strategy: Strategy, optimizer: OptimizerName, quantize: str | None = None) -> None:
    """Refuse, before any process starts, what FSDP cannot shard: bitsandbytes' quantized weights and 8-bit state."""
    if strategy == "fsdp" and quantize:
        raise UserError(f"--quantize {quantize} does not work with --strategy fsdp (bitsandbytes weights cannot be "
                        f"sharded); use --strategy ddp, or no --quantize")
    if strategy == "fsdp" and optimizer == "AdamW8bit":
        raise UserError("--optimizer AdamW8bit does not work with --strategy fsdp (its 8-bit state cannot be "
                        "sharded); use --optimizer AdamW")


def check_tensor_parallel(config: Config, tensor_parallel: int, devices: int, strategy: Strategy) -> None:
    """Refuse, before any process starts, a tensor-parallel size the devices or the model cannot be split by."""
    if tensor_parallel == 1:
        return
    if tensor_parallel < 1 or devices % tensor_parallel:
        raise UserError(f"--tensor_parallel {tensor_parallel} must divide the {devices} device(s) (--devices x "
                        "--num_nodes)")
    if strategy == "ddp":
        raise UserError("--tensor_parallel goes with --strategy fsdp (the data-parallel groups shard with FSDP) or "
                        "auto, not ddp")
    for name, size in (("attention heads", config.n_heads), ("key/value heads", config.n_kv_heads),
                       ("MLP width", config.intermediate_size)):
        if size % tensor_parallel:
            raise UserError(f"--tensor_parallel {tensor_parallel}: the model's {size} {name} do not split evenly "
                            f"over {tensor_parallel} devices; use a --tensor_parallel that divides "
                            f"{config.n_heads} heads, {config.n_kv_heads} key/value heads and "
                            f"{config.intermediate_size} MLP columns")


def data_parallel(fabric: L.Fabric) -> tuple[int, int]:
    """This process's rank among the data-parallel groups, and their number: the devices that see different data.
    A tensor-parallel group (devices splitting each weight) sees one batch; without one, every device is a group."""
    if isinstance(fabric.strategy, FullySharded):
        mesh = fabric.strategy.device_mesh["data_parallel"]
        return mesh.get_local_rank(), mesh.size()
    return fabric.global_rank, fabric.world_size


def setup_fabric(out_dir: Path, precision: str | None, logger: LoggerName, devices: int = 1, num_nodes: int = 1,
                 strategy: Strategy = "auto", tensor_parallel: int = 1) -> L.Fabric:
    """Fabric with the chosen precision, devices and strategy, and a logger writing under out_dir/logs.

    Strategies: auto (one device), ddp (a replica of the model per device), fsdp (FullyShardedDataParallel). With
    tensor_parallel T > 1 the devices form groups of T that split each weight (see FullySharded), fsdp or not.

    Launched by `fabric run`, `torchrun` or SLURM, Fabric takes ranks and addresses from their environment; run
    plainly with devices > 1, it starts the other processes itself.
    """
    precision = precision or default_precision()
    if strategy == "fsdp" or tensor_parallel > 1:
        compute_dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
        strategy = FullySharded(devices * num_nodes, compute_dtype, tensor_parallel)
    try:
        fabric = L.Fabric(devices=devices, num_nodes=num_nodes, strategy=strategy, precision=precision,
                          loggers=[metrics_logger(logger, out_dir)])
    except ValueError as e:  # Fabric's message lists the valid precisions
        raise UserError(f"--precision: {' '.join(str(e).split())}") from None
    fabric.launch()
    if fabric.device.type == "cpu":
        keep_freed_memory()
    half = {"bf16": torch.bfloat16, "16": torch.float16}.get(str(fabric.strategy.precision.precision).split("-")[0])
    if fabric.global_rank == 0:
        warn_if_slow_on_cpu(half, fabric.device, "--precision 32-true")
    return fabric


def metrics_logger(name: LoggerName, out_dir: Path):
    if name not in get_args(LoggerName):
        raise UserError(f"--logger {name!r} is not one of {', '.join(get_args(LoggerName))}")
    if name != "csv" and importlib.util.find_spec(name) is None:  # the package is named as the logger
        raise UserError(f"--logger {name} needs the {name} package: pip install {name}")
    if name == "tensorboard":
        from lightning_fabric.loggers import TensorBoardLogger

        return TensorBoardLogger(out_dir, name="logs")
    if name == "wandb":
        return WandbLogger(out_dir)
    from lightning_fabric.loggers import CSVLogger

    # flushed at every log, so a killed run keeps its metrics up to the kill
    return CSVLogger(out_dir, name="logs", flush_logs_every_n_steps=1)


class WandbLogger(Logger):
    """Metrics to a Weights & Biases run of project "litllm" (wandb's own Fabric logger needs the whole `lightning`
    package, which litllm does not install: Fabric alone starts several seconds faster)."""

    def __init__(self, save_dir: Path) -> None:
        super().__init__()
        self.save_dir = save_dir
        self._run = None

    @property
    def name(self) -> str:
        return "litllm"

    @property
    def version(self) -> str:
        return self.experiment.id

    @property
    def experiment(self):
        if self._run is None:
            import wandb

            self._run = wandb.init(project="litllm", dir=self.save_dir)
        return self._run

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.experiment.log(metrics, step=step)

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any]) -> None:
        self.experiment.config.update(params)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._run is not None:
            self._run.finish(exit_code=0 if status == "success" else 1)


class FullySharded(ModelParallelStrategy):
    """FSDP through Fabric: torch's `fully_shard` (FSDP2) on each transformer block, then on the model (embeddings,
    final norm, lm_head). Each of the N processes holds 1/N of the weights, gradients and optimizer state, and
    gathers one block's weights at a time for its forward and backward.

    With `tensor_parallel` T > 1 the N devices form N / T groups of T (2D: a data-parallel by a tensor-parallel
    mesh). Within a group each block's weights are split Megatron-style: q/k/v and gate/up by output columns, o and
    down by input columns, so each device computes attention over its own heads and its share of the MLP, and one
    all-reduce per o_proj and down_proj sums the parts. Embeddings, norms and lm_head are whole on every device (so
    tied embeddings stay tied). The groups then shard with FSDP across each other, and see different data.

    (Fabric's FSDPStrategy wraps the older FSDP1 API, which runs on GPUs only; FSDP2 also runs on CPUs with gloo.)
    Remembers the model's unsharded structure, without data, into which checkpoints gather the full weights.

    With a mixed precision (`compute_dtype` bfloat16 or float16) the weights are gathered in that dtype, half the
    bytes of float32 on the wire and in memory, while the shards, the optimizer and the gradient reduction stay in
    float32 (FSDP2's MixedPrecisionPolicy).
    """

    def __init__(self, world_size: int, compute_dtype: torch.dtype | None = None, tensor_parallel: int = 1) -> None:
        super().__init__(self.shard_blocks, data_parallel_size=world_size // tensor_parallel,
                         tensor_parallel_size=tensor_parallel, save_distributed_checkpoint=False)
        self.layout: nn.Module | None = None
        self.compute_dtype = compute_dtype
        self.tensor_parallel = tensor_parallel

    def clip_gradients_norm(self, module: nn.Module, optimizer, max_norm: float, norm_type: float = 2.0,
                            error_if_nonfinite: bool = True) -> torch.Tensor:
        """Clip the gradients to a total norm, as torch's clip_grad_norm_, but over gradients that live on different
        meshes (2D: split weights on data x tensor parallel, whole ones on data parallel only), which it cannot stack:
        each mesh's norm, then the norm of those."""
        from torch.distributed.tensor import DTensor

        self.precision.unscale_gradients(optimizer)
        params = [p for p in self.precision.main_params(optimizer) if p.grad is not None]
        by_mesh: dict[Any, list[torch.Tensor]] = {}
        for p in params:
            by_mesh.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p.grad)
        norms = [torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite) for grads in by_mesh.values()]
        norms = [norm.full_tensor() if isinstance(norm, DTensor) else norm for norm in norms]
        total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
        scale = min(1.0, max_norm / (float(total) + 1e-6))  # torch's clip coefficient, as a number: any mesh takes it
        for p in params:
            p.grad.mul_(scale)
        return total

    def shard_blocks(self, model: nn.Module, device_mesh) -> nn.Module:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        if isinstance(model, FSDPModule):  # sharded already, as it was loaded (see load_for_training)
            return model
        self.layout = empty_copy(model)
        if self.tensor_parallel > 1:
            split_blocks(model, device_mesh["tensor_parallel"])
        mesh = device_mesh["data_parallel"]
        policy = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
        for block in model.layers:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model


def split_blocks(model: GPT, mesh) -> None:
    """Tensor parallelism within `mesh`: each block's q/k/v and gate/up split by output columns, o and down by input
    columns (their outputs summed over the mesh), and each attention module told its local head counts."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    columns, rows = ColwiseParallel(), RowwiseParallel()
    plan = {"attn.q_proj": columns, "attn.k_proj": columns, "attn.v_proj": columns, "attn.o_proj": rows,
            "mlp.gate_proj": columns, "mlp.up_proj": columns, "mlp.down_proj": rows}
    for block in model.layers:
        parallelize_module(block, mesh, plan)
        block.attn.n_heads //= mesh.size()
        block.attn.n_kv_heads //= mesh.size()


def load_for_training(fabric: L.Fabric, checkpoint_dir: Path) -> GPT:
    """The checkpoint's model in the training dtype (see model_dtype) on the run's device. Under FSDP it is built on
    the meta device, sharded, and each process reads from the safetensors files only the rows of each weight its
    shard holds: no process ever holds the whole model (a 70B model loads on GPUs that each fit 1/N of it)."""
    if not isinstance(fabric.strategy, FullySharded) or fabric.strategy.tensor_parallel > 1:
        return load_model(checkpoint_dir, dtype=model_dtype(fabric), device=fabric.device)
    config = Config.from_hf(checkpoint_dir)
    with torch.device("meta"):
        model = GPT(config).to(model_dtype(fabric))
    sources = weight_sources(checkpoint_dir, model)
    mesh = fabric.strategy.device_mesh["data_parallel"]
    model = fabric.strategy.shard_blocks(model, fabric.strategy.device_mesh)
    model.to_empty(device=fabric.device)
    rank, world_size = mesh.get_local_rank(), mesh.size()
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied lm_head is the embedding, listed once
            file, hf_name = sources[name]
            shard = param.to_local()
            rows = -(-param.shape[0] // world_size)  # FSDP2 cuts dim 0 as torch.chunk does
            with safe_open(file, framework="pt") as f:
                start = min(rank * rows, param.shape[0])
                shard.copy_(f.get_slice(hf_name)[start:start + shard.shape[0]])
        model.rope.inv_freq.copy_(rope_frequencies(config)[0])  # a buffer to_empty left uninitialized
    return model.eval()


@contextmanager
def full_weights(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block every FSDP-sharded part of `module` holds its full weights, gathered once and kept through
    any number of forward passes, so each process may run forwards of its own (sampling, which stops at a different
    step on each) with no collective per forward. It costs a full copy of the weights per device meanwhile. Outside
    FSDP nothing changes."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for part in sharded:
        part.unshard()
        part.set_reshard_after_forward(False, recurse=False)
    try:
        yield module
    finally:
        for part in sharded:  # as FSDP2 sets them: blocks reshard after forward, the root keeps its weights
            part.set_reshard_after_forward(part is not module, recurse=False)
            part.reshard()


def empty_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters and buffers are on the meta device: its structure, without its data."""
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
    return copy.deepcopy(module, memo)


def model_dtype(fabric: L.Fabric) -> torch.dtype:
    """The dtype to load weights in: the training dtype for "-true" precisions, float32 for mixed ones."""
    return {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(fabric.strategy.precision.precision,
                                                                      torch.float32)
