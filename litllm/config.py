"""Model configuration: one dataclass for every family, read from a Hugging Face config.json."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from litllm.errors import UserError

# model_type -> the transformers class that loads it (config.json's "architectures")
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class Config:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008  # SwiGLU inner size
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32  # < n_heads is grouped-query attention
    head_dim: int = 0  # 0: hidden_size // n_heads (Qwen3 sets it explicitly)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None or {"rope_type": "linear"|"llama3"|"yarn", "factor": ..., ...} with HF's keys
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 4096  # HF max_position_embeddings
    sliding_window: int | None = None  # Mistral: each token sees only the last `sliding_window` keys
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    attention_out_bias: bool = False  # bias on o_proj too (Llama with attention_bias)
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before RoPE (Qwen3)
    tie_embeddings: bool = False  # lm_head shares the embedding matrix
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    torch_dtype: str = "float32"  # the dtype the checkpoint's weights are stored in
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # HF keys we keep but do not use

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "n_layers", "n_heads", "n_kv_heads",
                     "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.n_heads
        if self.head_dim < 1:
            raise UserError(f"head_dim must be a positive integer, got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf(cls, source: Path | str | dict) -> "Config":
        """Read a HF config.json (a path to it, to its directory, or the parsed dict).

        Both RoPE layouts are read: transformers 5's `rope_parameters` and the older `rope_theta` +
        `rope_scaling` that most hub checkpoints still carry.
        """
        path = None
        if isinstance(source, dict):
            hf = dict(source)
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise UserError(f"{path}: not found; a checkpoint dir needs the model's config.json")
            try:
                hf = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); fix or re-download the file") from None
        where = str(path) if path else "config"

        def need(key: str) -> Any:
            if key not in hf:
                raise UserError(f"{where}: missing key '{key}'; is this a complete HF config.json?")
            return hf[key]

        model_type = hf.get("model_type")
        if model_type not in FAMILIES:
            raise UserError(
                f"{where}: model_type '{model_type}' is not supported (supported: {', '.join(FAMILIES)})"
            )
        if hf.get("mlp_bias"):
            raise UserError(f"{where}: 'mlp_bias': true is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise UserError(f"{where}: hidden_act '{hf['hidden_act']}' is not supported (only silu/SwiGLU)")

        rope_theta, rope_scaling = _read_rope(hf, where)
        sliding_window = _read_sliding_window(hf, model_type, where)
        attention_bias = model_type == "qwen2" or bool(hf.get("attention_bias", False))
        used = {
            "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
            "rope_scaling", "rope_parameters", "max_position_embeddings", "sliding_window",
            "use_sliding_window", "max_window_layers", "layer_types", "attention_bias", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "torch_dtype", "dtype",
            "architectures", "transformers_version", "hidden_act", "mlp_bias",
        }
        fields = dict(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            n_layers=need("num_hidden_layers"),
            n_heads=need("num_attention_heads"),
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim") or 0,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_seq_len=hf.get("max_position_embeddings", 4096),
            sliding_window=sliding_window,
            attention_bias=attention_bias,
            attention_out_bias=model_type != "qwen2" and attention_bias,  # Qwen2 biases q/k/v only
            qk_norm=model_type == "qwen3",
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            initializer_range=hf.get("initializer_range", 0.02),
            torch_dtype=hf.get("torch_dtype") or hf.get("dtype") or "float32",
            extra={k: v for k, v in hf.items() if k not in used},
        )
        try:
            return cls(**fields)
        except UserError as error:  # sizes that make no model
            raise UserError(f"{where}: {error}") from None

    def to_hf(self) -> dict[str, Any]:
        """The config.json transformers reads. RoPE goes in the older `rope_theta` + `rope_scaling`
        layout, which transformers 4 and 5, vLLM and llama.cpp's converter all read."""
        hf = {
            "architectures": [FAMILIES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "initializer_range": self.initializer_range,
            "torch_dtype": self.torch_dtype,
        }
        if self.model_type == "mistral":
            hf["sliding_window"] = self.sliding_window
        if self.model_type in ("qwen2", "qwen3"):
            hf["use_sliding_window"] = self.sliding_window is not None
            hf["sliding_window"] = self.sliding_window
            if self.sliding_window is not None:
                hf["max_window_layers"] = 0  # every layer slides, as litllm computes it
        if self.model_type in ("llama", "qwen3") or self.attention_bias:
            hf["attention_bias"] = self.attention_bias
        return {**self.extra, **hf}

    # ------------------------------------------------------------------ named configs for scratch training
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Config":
        if name not in NAMED_CONFIGS:
            raise UserError(f"unknown model name '{name}' (known: {', '.join(NAMED_CONFIGS)})")
        return replace(NAMED_CONFIGS[name], **overrides)


def _read_rope(hf: dict, where: str) -> tuple[float, dict | None]:
    params = hf.get("rope_parameters")
    if params is not None:  # transformers >= 5
        if "rope_theta" not in params:
            raise UserError(f"{where}: rope_parameters per layer type is not supported ({list(params)})")
        params = dict(params)
        rope_theta = params.pop("rope_theta")
    else:  # most hub checkpoints
        rope_theta = hf.get("rope_theta", 10000.0)
        params = dict(hf.get("rope_scaling") or {})
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in ROPE_TYPES:
        raise UserError(f"{where}: rope type '{rope_type}' is not supported (supported: {', '.join(ROPE_TYPES)})")
    if rope_type == "default":
        return float(rope_theta), None
    if rope_type in ("llama3", "yarn"):
        params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    return float(rope_theta), {"rope_type": rope_type, **params}


def _read_sliding_window(hf: dict, model_type: str, where: str) -> int | None:
    window = hf.get("sliding_window")
    if model_type == "mistral":
        return window
    if model_type not in ("qwen2", "qwen3") or not hf.get("use_sliding_window") or window is None:
        return None
    # Qwen slides only in layers >= max_window_layers; litllm supports the uniform case
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if i >= hf.get("max_window_layers", 0) else "full_attention"
        for i in range(hf["num_hidden_layers"])
    ]
    if len(set(layer_types)) > 1:
        raise UserError(f"{where}: sliding window on only some layers is not supported (layer_types mixes both)")
    return window if layer_types[0] == "sliding_attention" else None


# Architectures to pretrain from scratch (`litllm pretrain --model_name NAME`). The vocabulary sizes fit the tokenizers
# they are meant for (SmolLM2's 49,152 tokens, Llama 3's 128,256); PARAMETER_COUNTS says what each builds.
NAMED_CONFIGS: dict[str, Config] = {
    # a small Llama with SmolLM2's vocabulary: trains on a laptop CPU in minutes (the tied embedding is 9.4M of it)
    "llama-tiny": Config(
        model_type="llama", vocab_size=49152, hidden_size=192, intermediate_size=512, n_layers=6,
        n_heads=6, n_kv_heads=2, max_seq_len=1024, rope_theta=10000.0, tie_embeddings=True,
    ),
    "smollm2-135m": Config(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, n_layers=30,
        n_heads=9, n_kv_heads=3, max_seq_len=8192, rope_theta=100000.0, tie_embeddings=True,
    ),
    "llama-3.2-1b": Config(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, n_layers=16,
        n_heads=32, n_kv_heads=8, max_seq_len=131072, rope_theta=500000.0, tie_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    ),
}

# Parameters each named config builds, tied embeddings counted once (the published sizes of SmolLM2-135M and
# Llama-3.2-1B); tests/test_pretrain.py checks them against litllm's model and transformers'.
PARAMETER_COUNTS: dict[str, int] = {
    "llama-tiny": 11_798_976,
    "smollm2-135m": 134_515_008,
    "llama-3.2-1b": 1_235_814_400,
}
