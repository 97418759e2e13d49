"""Hugging Face checkpoint directories in and out. The HF <-> litllm parameter-name map lives here only."""
from __future__ import annotations

import functools
import json
import re
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from litllm.config import Config
from litllm.errors import UserError
from litllm.files import atomic_dir
from litllm.model import GPT, RewardGPT
from litllm.tokenizer import TOKENIZER_FILES

# litllm name <-> HF name, per block; leaf names (q_proj, gate_proj, ...) are shared
_BLOCK_NAMES = [
    ("attn_norm", "input_layernorm"),
    ("mlp_norm", "post_attention_layernorm"),
    ("attn", "self_attn"),
    ("mlp", "mlp"),
]
_HF_BLOCK = re.compile(r"^model\.layers\.(\d+)\.([a-z_]+)\.(.+)$")
_LIT_BLOCK = re.compile(r"^layers\.(\d+)\.([a-z_]+)\.(.+)$")


def hf_to_litllm(name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `layers.3.attn.q_proj.weight`; lm_head and score stay."""
    if m := _HF_BLOCK.match(name):
        i, part, rest = m.groups()
        for lit, hf in _BLOCK_NAMES:
            if part == hf:
                return f"layers.{i}.{lit}.{rest}"
    if name.startswith("model."):
        return name[len("model."):]  # embed_tokens, norm
    return name


def litllm_to_hf(name: str) -> str:
    if m := _LIT_BLOCK.match(name):
        i, part, rest = m.groups()
        for lit, hf in _BLOCK_NAMES:
            if part == lit:
                return f"model.layers.{i}.{hf}.{rest}"
    if name.startswith(("lm_head.", "score.")):  # the heads sit beside the transformer, not in it
        return name
    return f"model.{name}"


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a dtype or its name ("bfloat16", "bf16", "torch.float16")."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = str(dtype).removeprefix("torch.")
    name = aliases.get(name, name)
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise UserError(f"dtype '{dtype}' is not a floating-point torch dtype (try float32, bfloat16, float16)")
    return value


def inference_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype | None:
    """The dtype to run a model in: the one asked for, else float32 on CPU (more exact, and on CPUs without fast
    half-precision products faster for long prompts) and the checkpoint's own (None) on GPU. Inference in bfloat16 or
    float16 is not warned about on such CPUs: its products run as decode.HalfLinear, not at the half kernels' speed."""
    return parse_dtype(dtype) or (torch.float32 if device.type == "cpu" else None)


SLOW = 4  # cpu_matmul_slowdown from which a dtype's products count as slow on this CPU


def warn_if_slow_on_cpu(dtype: torch.dtype | None, device: torch.device, fix: str) -> None:
    """One warning line when matrix products in `dtype` (bfloat16, float16) run far slower on this CPU than in float32:
    without AVX-512 PyTorch has no fast half-precision kernel (on a 2-core AVX2 AMD EPYC: 1.4 against 130 GFLOP/s)."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return
    slowdown = cpu_matmul_slowdown(dtype)
    if slowdown >= SLOW:
        print(f"warning: {str(dtype).removeprefix('torch.')} matrix products run {slowdown:.0f}x slower than float32 "
              f"on this CPU (measured just now); {fix} is faster here", file=sys.stderr)


@functools.cache
def cpu_matmul_slowdown(dtype: torch.dtype) -> float:
    """How many times longer a 256 x 256 by 256 x 256 matrix product takes in `dtype` than in float32 on this CPU:
    the best of 3 each, taken in turns, and where that reads as slow (SLOW), of 10 more each. A fast product takes
    tens of microseconds, so on a busy machine three that each met a stall read as a slow kernel (a loaded 2-core
    Xeon whose bfloat16 products are faster than its float32 ones measured 5x): only a slowdown that every try
    confirms counts. ~0.4 s in all where the dtype is slow (~30 ms a product), ~50 ms where it is not."""
    half, single = torch.ones(256, 256, dtype=dtype), torch.ones(256, 256)
    best = {}
    for a in (half, single):  # first calls: kernel selection
        a @ a
    for tries in (3, 10):
        for _ in range(tries):
            for a in (half, single):
                start = time.perf_counter()
                a @ a
                best[a.dtype] = min(best.get(a.dtype, float("inf")), time.perf_counter() - start)
        if best[dtype] / best[torch.float32] < SLOW:
            break
    return best[dtype] / best[torch.float32]


def parse_device(device: torch.device | str | None) -> torch.device:
    """The device to run on (default: cuda when available); a name torch does not know, or a GPU this machine does
    not have, is a user error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UserError(f"device '{device}' is not a torch device name (try cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{device}': no CUDA GPU is available on this machine; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device '{device}': this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def safetensors_files(checkpoint_dir: Path) -> list[Path]:
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise UserError(f"{index}: not a safetensors index (a JSON object with a 'weight_map')") from None
        inside = checkpoint_dir.resolve()
        for shard in shards:
            # the index is data from elsewhere: it may only name files in this directory
            if not isinstance(shard, str) or Path(shard).is_absolute() \
                    or inside not in (inside / shard).resolve().parents:
                raise UserError(f"{index}: the shard {shard!r} is not a file inside {checkpoint_dir}")
        return [checkpoint_dir / shard for shard in shards]
    single = checkpoint_dir / "model.safetensors"
    if single.is_file():
        return [single]
    if any(checkpoint_dir.glob("*.bin")) or any(checkpoint_dir.glob("*.pt")):
        raise UserError(
            f"{checkpoint_dir}: only pickled weights (*.bin/*.pt) found; litllm reads safetensors only "
            "(convert them with transformers' save_pretrained(safe_serialization=True))"
        )
    raise UserError(f"{checkpoint_dir}: no model.safetensors or model.safetensors.index.json found")


def check_checkpoint_dir(checkpoint_dir: Path | str) -> Path:
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise UserError(
            f"{checkpoint_dir}: checkpoint directory not found; get one with `litllm download REPO_ID` "
            "or `litllm convert from_gguf FILE.gguf --out_dir DIR`"
        )
    return checkpoint_dir


def load_model(
    checkpoint_dir: Path | str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
    reward: bool = False,
) -> GPT:
    """Build the model of a HF checkpoint dir and load its weights (single file or shards).

    With `reward`, a RewardGPT: from a reward model dir (*ForSequenceClassification) with its score head, or from a
    causal LM with a new score head (initialized as transformers does: normal, std initializer_range; seed first)
    and without its lm_head. Names and shapes are checked against config.json before any weight is read.
    """
    checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
    config = Config.from_hf(checkpoint_dir)
    dtype = dtype or parse_dtype(config.torch_dtype)
    with torch.device("meta"):
        model = RewardGPT(config) if reward else GPT(config)
    found = weight_sources(checkpoint_dir, model, reward)
    new_head = reward and "score.weight" not in found
    state_dict = {}
    for file in safetensors_files(checkpoint_dir):
        with safe_open(file, framework="pt", device=str(device)) as f:
            for name, (source, hf_name) in found.items():
                if source == file:
                    state_dict[name] = f.get_tensor(hf_name).to(dtype)
    model.load_state_dict(state_dict, strict=False, assign=True)
    if new_head:
        model.score = torch.nn.Linear(config.hidden_size, 1, bias=False, device=device, dtype=dtype)
        torch.nn.init.normal_(model.score.weight, std=config.initializer_range)
    elif config.tie_embeddings and not reward:
        model.lm_head.weight = model.embed_tokens.weight
    model.rope.to(device)
    return model.eval()


def weight_sources(checkpoint_dir: Path, model: GPT, reward: bool = False) -> dict[str, tuple[Path, str]]:
    """Where each of `model`'s weights is in the checkpoint's safetensors: {litllm name: (file, HF name)}, after
    checking names and shapes against the model built from config.json (a UserError says what does not match). A
    reward model built from a causal LM has no score head there yet (left out)."""
    config = model.config
    expected = {name: tensor.shape for name, tensor in model.state_dict().items()
                if not (config.tie_embeddings and name == "lm_head.weight")}
    files = safetensors_files(checkpoint_dir)
    found = {}  # litllm name -> (file, HF name, shape)
    for file in files:
        with safe_open(file, framework="pt") as f:
            for hf_name in f.keys():
                found[hf_to_litllm(hf_name)] = (file, hf_name, torch.Size(f.get_slice(hf_name).get_shape()))
    if config.tie_embeddings or reward:
        found.pop("lm_head.weight", None)  # the tied copy some checkpoints also store; a reward model has none
    if "score.weight" in found and not reward:
        raise UserError(f"{checkpoint_dir}: a reward model (a score head, no lm_head) scores text but does not "
                        "generate it; load it with `from litllm import RewardModel; RewardModel.load(...)`")
    new_head = reward and "score.weight" not in found
    if new_head:
        expected.pop("score.weight")
    missing, unexpected = expected.keys() - found.keys(), found.keys() - expected.keys()
    if missing or unexpected:
        raise UserError(
            f"{checkpoint_dir}: weights do not match config.json "
            f"(missing: {sorted(missing)[:3]}, unexpected: {sorted(unexpected)[:3]})"
        )
    for name, (_, hf_name, shape) in found.items():
        if shape != expected[name]:
            raise UserError(f"{checkpoint_dir}: weight {hf_name} has shape {tuple(shape)} but config.json makes it "
                            f"{tuple(expected[name])}; the config does not belong to these weights")
    return {name: (file, hf_name) for name, (file, hf_name, _) in found.items()}


def is_model_dir_file(name: str) -> bool:
    """Whether litllm writes a file of this name into a Hugging Face model dir (config, weights, tokenizer)."""
    return (name in ("config.json", "model.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES)
            or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name) is not None)


def copy_tokenizer_files(source_dir: Path | str, out_dir: Path | str) -> None:
    for name in TOKENIZER_FILES:
        if (Path(source_dir) / name).is_file():
            shutil.copy2(Path(source_dir) / name, Path(out_dir) / name)


def save_checkpoint(
    model: GPT,
    out_dir: Path | str,
    tokenizer_dir: Path | str | None = None,
    max_shard_size: int = 5 * 1024**3,
) -> Path:
    """Write `model` as a HF model dir that transformers loads unchanged, atomically.

    Weights are sharded with an index above `max_shard_size` bytes; tokenizer files are copied from
    `tokenizer_dir`. An existing `out_dir` is replaced only once the new one is complete.
    """
    with atomic_dir(out_dir) as tmp:
        write_model_files(model, tmp, max_shard_size)
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
    return Path(out_dir)


def write_model_files(model: GPT, out_dir: Path, max_shard_size: int = 5 * 1024**3) -> None:
    config = model.config
    tensors = {}
    for name, tensor in model.state_dict().items():
        if config.tie_embeddings and name == "lm_head.weight":
            continue  # stored once, as the embedding
        tensors[litllm_to_hf(name)] = tensor.detach().contiguous().cpu()
    dtype = next(iter(tensors.values())).dtype
    hf_config = config.to_hf()
    if isinstance(model, RewardGPT):  # what transformers' AutoModelForSequenceClassification reads
        family = hf_config["architectures"][0].removesuffix("ForCausalLM")
        hf_config |= {"architectures": [f"{family}ForSequenceClassification"], "id2label": {"0": "LABEL_0"},
                      "label2id": {"LABEL_0": 0}}
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], out_dir / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out_dir / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
