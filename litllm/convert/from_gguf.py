"""`litllm convert from_gguf`: a llama.cpp GGUF file unpacked into a Hugging Face model directory.

A GGUF packs a whole model into one file: the config as metadata under llama.cpp's key names, the
tokenizer as a vocabulary list, the weights quantized and in llama.cpp's layout. This module reads it
back into config.json, generation_config.json, model.safetensors (float32), tokenizer.json and
tokenizer_config.json; its name tables are what to_gguf writes by.
"""
from __future__ import annotations

import json
import math
import mmap
import struct
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

from litllm.convert.gguf_pre_tokenizers import BY_NAME
from litllm.checkpoint import is_model_dir_file
from litllm.config import FAMILIES
from litllm.errors import UserError
from litllm.files import atomic_dir, check_out_dir, refuse_to_overwrite

# GGUF architecture -> Hugging Face model_type. Mistral and most Llama fine-tunes are "llama" in GGUF.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

# tensor names: GGUF "blk.N.<key>" -> Hugging Face "model.layers.N.<value>"
BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
MODEL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

def from_gguf(gguf_file: Path, out_dir: Path | None = None, overwrite: bool = False) -> Path:
    """Unpack a llama.cpp GGUF file into a Hugging Face model directory, weights dequantized to float32.

    Args:
        gguf_file: The .gguf file to read (Llama, Mistral, Qwen2 or Qwen3 architecture).
        out_dir: The directory to write config.json, model.safetensors and the tokenizer files into
            (default: checkpoints/<file name without .gguf>).
        overwrite: Replace a model dir at out_dir (only a model dir: any other file found there stops the command).
    """
    gguf_file = Path(gguf_file)
    out_dir = Path(out_dir) if out_dir is not None else Path("checkpoints") / gguf_file.stem
    if not gguf_file.is_file():
        raise UserError(f"GGUF file not found: {gguf_file}")
    check_out_dir(out_dir, inputs=[gguf_file])
    refuse_to_overwrite(out_dir, overwrite, owned=is_model_dir_file)

    check_gguf_file(gguf_file)
    reader = gguf.GGUFReader(gguf_file)
    metadata = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    config = hf_config(metadata, tensors, gguf_file)
    tokenizer, tokenizer_config = hf_tokenizer(metadata, gguf_file)
    # written into a temp dir and renamed into place: an interrupted run never leaves half a model dir
    with atomic_dir(out_dir) as tmp:
        save_file(hf_state_dict(tensors, config, gguf_file), tmp / "model.safetensors", metadata={"format": "pt"})
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", _generation_config(metadata))
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", tokenizer_config)
    return out_dir


# GGUF metadata values: how many bytes a scalar takes, by value type
_SCALAR_SIZES = {
    gguf.GGUFValueType.UINT8: 1, gguf.GGUFValueType.INT8: 1, gguf.GGUFValueType.BOOL: 1,
    gguf.GGUFValueType.UINT16: 2, gguf.GGUFValueType.INT16: 2,
    gguf.GGUFValueType.UINT32: 4, gguf.GGUFValueType.INT32: 4, gguf.GGUFValueType.FLOAT32: 4,
    gguf.GGUFValueType.UINT64: 8, gguf.GGUFValueType.INT64: 8, gguf.GGUFValueType.FLOAT64: 8,
}
# the fewest bytes a metadata value of each type can take: a string or an array is at least its length field(s)
_MIN_SIZES = {**_SCALAR_SIZES, gguf.GGUFValueType.STRING: 8, gguf.GGUFValueType.ARRAY: 4 + 8}
_MAX_DIMS = 4  # GGML_MAX_DIMS


def check_gguf_file(gguf_file: Path) -> None:
    """Walk the file's layout and refuse, in one line, anything gguf's reader would crash or loop on.

    gguf's reader trusts every length and count in the file: a truncated file ends in a numpy traceback, and a
    49-byte file that declares 2^40 array items makes it loop for hours. Here every length is checked against what
    is left of the file before anything is read by it, and every tensor's data must lie inside the file.
    """
    with gguf_file.open("rb") as f:
        magic = f.read(4)
        if magic != b"GGUF":
            raise UserError(f"{gguf_file}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _check_gguf_layout(data, gguf_file)


def _check_gguf_layout(data: mmap.mmap, gguf_file: Path) -> None:
    size, offset = len(data), 4  # after the magic

    def damaged(what: str) -> UserError:
        return UserError(f"{gguf_file}: damaged or truncated GGUF file: {what} (at byte {offset} of {size})")

    def take(n_bytes: int, what: str) -> bytes:
        nonlocal offset
        if n_bytes > size - offset:
            raise damaged(f"{what} needs {n_bytes} bytes, only {size - offset} are left")
        offset += n_bytes
        return data[offset - n_bytes:offset]

    def number(fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, take(struct.calcsize(fmt), what))[0]

    def string(what: str) -> str:
        try:
            return take(number("Q", f"the length of {what}"), what).decode("utf-8")
        except UnicodeDecodeError:
            raise damaged(f"{what} is not UTF-8 text") from None

    def count(what: str, min_item_size: int) -> int:
        n = number("Q", f"the count of {what}")
        if n * min_item_size > size - offset:
            raise damaged(f"{n} {what} cannot fit in the {size - offset} bytes left")
        return n

    def skip_value(value_type: int, what: str) -> None:
        if value_type in _SCALAR_SIZES:
            take(_SCALAR_SIZES[value_type], what)
        elif value_type == gguf.GGUFValueType.STRING:
            string(what)
        elif value_type == gguf.GGUFValueType.ARRAY:
            item_type = number("I", f"the item type of {what}")
            if item_type not in _MIN_SIZES:
                raise damaged(f"{what} has items of unknown type {item_type}")
            n_items = count(f"items of {what}", _MIN_SIZES[item_type])
            if item_type in _SCALAR_SIZES:
                take(n_items * _SCALAR_SIZES[item_type], what)
            else:
                for _ in range(n_items):
                    skip_value(item_type, what)
        else:
            raise damaged(f"{what} has unknown value type {value_type}")

    version = number("I", "the version")
    if version not in (2, 3):
        raise UserError(f"{gguf_file}: GGUF version {version} is not supported (supported: 2, 3)")
    n_tensors = number("Q", "the tensor count")
    n_entries = count("metadata entries", 8 + 4)  # each at least a key length and a value type
    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    keys = set()
    for _ in range(n_entries):
        key = string("a metadata key")
        if key in keys:
            raise damaged(f"metadata key {key!r} appears twice")
        keys.add(key)
        value_type = number("I", f"the type of {key}")
        if key == "general.alignment":
            alignment = number("I", key) if value_type == gguf.GGUFValueType.UINT32 else 0
            if alignment == 0 or alignment & (alignment - 1):
                raise damaged("general.alignment is not a power of two stored as a uint32")
        else:
            skip_value(value_type, key)
    if n_tensors * (8 + 4 + 4 + 8) > size - offset:  # each at least a name length, dimension count, type, offset
        raise damaged(f"{n_tensors} tensor descriptions cannot fit in the {size - offset} bytes left")
    known_types = {qtype.value for qtype in gguf.GGML_QUANT_SIZES}
    tensor_bytes = {}
    for _ in range(n_tensors):
        name = string("a tensor name")
        n_dims = number("I", f"the dimension count of {name}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise damaged(f"tensor {name!r} has {n_dims} dimensions (1 to {_MAX_DIMS} allowed)")
        shape = [number("Q", f"the shape of {name}") for _ in range(n_dims)]
        type_id = number("I", f"the type of {name}")
        if type_id not in known_types:
            raise damaged(f"tensor {name!r} has unknown type {type_id}")
        block_size, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
        if shape[0] % block_size:
            raise damaged(f"tensor {name!r} has rows of {shape[0]} values, not whole blocks of {block_size}")
        if name in tensor_bytes:
            raise damaged(f"tensor {name!r} appears twice")
        tensor_bytes[name] = (number("Q", f"the data offset of {name}"), math.prod(shape) // block_size * block_bytes)
    data_start = -(-offset // alignment) * alignment  # the tensor data begins at the next multiple of alignment
    for name, (start, n_bytes) in tensor_bytes.items():
        if data_start + start + n_bytes > size:
            offset = data_start + start
            raise damaged(f"the {n_bytes} bytes of tensor {name!r} run past the end of the file")


def hf_config(metadata: dict, tensors: dict[str, gguf.ReaderTensor], gguf_file: Path) -> dict:
    """The config.json of the model this GGUF holds, from llama.cpp's `<arch>.*` metadata keys."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise UserError(f"{gguf_file}: no general.architecture; not a model file")
    if arch not in ARCHITECTURES:
        raise UserError(
            f"{gguf_file}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    model_type = ARCHITECTURES[arch]

    def key(name: str, default=None):
        value = metadata.get(f"{arch}.{name}", default)
        if value is None:
            raise UserError(f"{gguf_file}: metadata key '{arch}.{name}' is missing; the file looks truncated")
        if not isinstance(value, (int, float)):
            raise UserError(f"{gguf_file}: metadata key '{arch}.{name}' is {value!r}, not a number")
        return value

    if "token_embd.weight" not in tensors:  # a LoRA adapter or a vocabulary-only file
        raise UserError(f"{gguf_file}: it has no token_embd.weight tensor; not a model file")
    hidden_size, n_heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", hidden_size // n_heads)
    if key("rope.dimension_count", head_dim) != head_dim:
        raise UserError(f"{gguf_file}: RoPE over part of each head (partial rotary) is not supported")
    rope_theta = _shortest_float(key("rope.freq_base", 10000.0))
    rope_factors = None
    if (rope_freqs := tensors.get("rope_freqs.weight")) is not None:  # Llama 3.1+: per-frequency RoPE divisors
        rope_factors = gguf.quants.dequantize(rope_freqs.data, rope_freqs.tensor_type)

    return {
        "architectures": [FAMILIES[model_type]],
        "model_type": model_type,
        "hidden_size": hidden_size,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": key("attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "rms_norm_eps": _shortest_float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(metadata, arch, rope_factors, rope_theta, head_dim, gguf_file),
        "max_position_embeddings": key("context_length"),
        # the embedding's row count, which can exceed the token list when it was padded for speed
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),
        # llama.cpp writes `output.weight` only when the output projection is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def hf_state_dict(tensors: dict[str, gguf.ReaderTensor], config: dict, gguf_file: Path) -> dict[str, torch.Tensor]:
    """Every GGUF tensor dequantized to float32 under its Hugging Face name, in Hugging Face's layout."""
    # named first, so an unsupported tensor stops the conversion before minutes of dequantizing
    # (`rope_freqs` is not a weight: it is already in config["rope_scaling"])
    hf_names = {name: _hf_tensor_name(name, gguf_file) for name in tensors if name != "rope_freqs.weight"}
    state_dict = {}
    for name, hf_name in tqdm(hf_names.items(), desc="Dequantizing", unit="tensor"):
        tensor = tensors[name]
        try:
            # numpy shapes already list GGUF's dimensions (`ne`, innermost first) in torch's order, outermost first
            weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as error:
            raise UserError(f"{gguf_file}: cannot dequantize {name} ({tensor.tensor_type.name}): {error}")
        weight = torch.tensor(weight, dtype=torch.float32)  # a copy: F32 tensors come as read-only views of the file
        if config["model_type"] == "llama" and (".attn_q." in name or ".attn_k." in name):
            n_heads = config["num_attention_heads"] if ".attn_q." in name else config["num_key_value_heads"]
            weight = _unpermute_rotary_rows(weight, n_heads)
        state_dict[hf_name] = weight.contiguous()
    return state_dict


def _hf_tensor_name(name: str, gguf_file: Path) -> str:
    stem, _, kind = name.rpartition(".")  # kind: "weight" or "bias"
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        hf_name = part in BLOCK_TENSORS and f"model.layers.{layer}.{BLOCK_TENSORS[part]}"
    else:
        hf_name = MODEL_TENSORS.get(stem)
    if not hf_name:
        raise UserError(f"{gguf_file}: tensor {name!r} has no Hugging Face counterpart; this variant is not supported")
    return f"{hf_name}.{kind}"


def _unpermute_rotary_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo the row order llama.cpp's converter gives Llama's q_proj and k_proj.

    Hugging Face rotates the two halves of each head against each other (rotate_half); llama.cpp's
    "llama" RoPE rotates adjacent pairs. Its converter reorders each head's rows from
    (first half, second half) to interleaved pairs so the same model comes out; we order them back.
    """
    head_dim = weight.shape[0] // n_heads
    # (n_heads * head_dim, ...) -> (n_heads, head_dim // 2, 2, ...): row pairs that llama.cpp interleaved
    pairs = weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:])
    return pairs.transpose(1, 2).reshape(weight.shape)


def _rope_scaling(
    metadata: dict, arch: str, rope_factors: np.ndarray | None, rope_theta: float, head_dim: int, gguf_file: Path
) -> dict | None:
    if rope_factors is not None and not np.allclose(rope_factors, 1.0):
        return _llama3_rope_scaling(rope_factors, rope_theta, head_dim, gguf_file)
    kind = metadata.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    factor = _shortest_float(metadata[f"{arch}.rope.scaling.factor"])
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        original = metadata[f"{arch}.rope.scaling.original_context_length"]
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    raise UserError(f"{gguf_file}: RoPE scaling {kind!r} is not supported (supported: linear, yarn)")


def _llama3_rope_scaling(rope_factors: np.ndarray, rope_theta: float, head_dim: int, gguf_file: Path) -> dict:
    """Recover Hugging Face's "llama3" RoPE parameters from the divisors llama.cpp stores per frequency.

    llama.cpp's converter evaluates Llama 3.1's rule into the `rope_freqs` tensor: frequencies whose
    wavelength is below `original / high_freq_factor` keep divisor 1, those above `original / low_freq_factor`
    get `factor`, and in between the divisor r obeys 1/r = (1 - s) / factor + s, with s linear in the
    frequency. Fitting that line gives back both boundary wavelengths. We state them with low_freq_factor = 1,
    as Llama 3 itself does (original 8192, low 1, high 4).
    """
    factors = rope_factors.astype(np.float64)
    factor = float(factors.max())
    frequencies = rope_theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    between = (factors > 1 + 1e-6) & (factors < factor - 1e-6)
    if between.sum() < 2:
        raise UserError(f"{gguf_file}: cannot read Llama 3 RoPE scaling from rope_freqs (too few scaled frequencies)")
    smooth = (1 / factors[between] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(frequencies[between], smooth, 1)
    long_wavelength = -2 * math.pi * slope / intercept  # where smooth = 0
    short_wavelength = 2 * math.pi * slope / (1 - intercept)  # where smooth = 1
    original = round(long_wavelength)
    return {
        "rope_type": "llama3",
        "factor": _shortest_float(factor),
        "low_freq_factor": 1.0,
        # rounded: the fit is good to about 1e-6 and the published values are round numbers
        "high_freq_factor": round(original / short_wavelength, 4),
        "original_max_position_embeddings": original,
    }


def hf_tokenizer(metadata: dict, gguf_file: Path) -> tuple[Tokenizer, dict]:
    """The tokenizer.json and tokenizer_config.json this GGUF's vocabulary describes.

    It is the tokenizer transformers builds when it loads the GGUF itself
    (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`): the same BPE model, pre-tokenizer, decoder
    and special tokens, so both encode every text to the same ids.
    """
    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list):
        raise UserError(f"{gguf_file}: no vocabulary (tokenizer.ggml.tokens); litllm imports models with a tokenizer")
    token_types = metadata.get("tokenizer.ggml.token_type", [gguf.TokenType.NORMAL] * len(tokens))
    merges = metadata.get("tokenizer.ggml.merges")
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(tokens, merges, metadata.get("tokenizer.ggml.pre"), gguf_file)
        # every token of a byte-level vocabulary is spelled in the 256-character byte alphabet; a "control"
        # token that is not is a llama.cpp labeling mistake, and adding it would grow the vocabulary
        spelling = set(pre_tokenizers.ByteLevel.alphabet())
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(tokens, merges, metadata.get("tokenizer.ggml.scores"))
        spelling = None
    else:
        raise UserError(f"{gguf_file}: tokenizer {kind!r} is not supported (supported: gpt2 (byte-level BPE), llama)")

    # Control tokens (<|im_start|>) and the unknown token (<unk>) are special: matched whole, dropped by
    # decode(skip_special_tokens=True). User-defined ones (<think>) are matched whole too but decode as text.
    tokenizer.add_special_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for token, token_type in zip(tokens, token_types)
            if token_type in (gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN)
            and (spelling is None or set(token) <= spelling)
        ]
    )
    vocab = tokenizer.get_vocab()
    tokenizer.add_tokens(
        [
            AddedToken(token, special=False, normalized=False)
            for token, token_type in zip(tokens, token_types)
            if token_type == gguf.TokenType.USER_DEFINED and token in vocab
        ]
    )

    named = {
        name: tokens[metadata[f"tokenizer.ggml.{key}_token_id"]]
        for name, key in [
            ("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")
        ]
        if f"tokenizer.ggml.{key}_token_id" in metadata
    }
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in named.values()])

    # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise
    add_bos = metadata.get("tokenizer.ggml.add_bos_token", kind == "llama") and "bos_token" in named
    add_eos = metadata.get("tokenizer.ggml.add_eos_token", False) and "eos_token" in named
    tokenizer.post_processor = _bos_eos_template(tokenizer, named, add_bos, add_eos)

    tokenizer_config = {
        # the class that takes tokenizer.json as it is, rather than rebuilding it from the vocabulary
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
    }
    if "tokenizer.chat_template" in metadata:
        tokenizer_config["chat_template"] = metadata["tokenizer.chat_template"]
    return tokenizer, tokenizer_config


def _byte_level_bpe(tokens: list[str], merges: list[str], pre_name: str | None, gguf_file: Path) -> Tokenizer:
    """GPT-2 style BPE over UTF-8 bytes, each byte spelled as one printable character (space is "Ġ"), cutting text
    into words as llama.cpp does for `pre_name`."""
    # A file without a name, and the "gpt2" litllm wrote before it used llama.cpp's names, cut like GPT-2, as
    # transformers' GGUF loader reads them.
    pre = BY_NAME.get("gpt-2" if pre_name in (None, "gpt2") else pre_name)
    if pre is None:
        raise UserError(f"{gguf_file}: pre-tokenizer {pre_name!r} (tokenizer.ggml.pre) is not one litllm can rebuild, "
                        f"so it would tokenize text unlike llama.cpp (it rebuilds: {', '.join(sorted(BY_NAME))})")
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    spell = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    # A few files store a token as its plain text ("\n\n") rather than in the byte alphabet ("ĊĊ").
    vocab = {
        token if set(token) <= alphabet else spell.pre_tokenize_str(token)[0][0]: index
        for index, token in enumerate(tokens)
    }
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[tuple(merge.split(" ")) for merge in merges],
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            ignore_merges=pre.ignore_merges,
        )
    )
    tokenizer.pre_tokenizer = pre.build()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(tokens: list[str], merges: list[str] | None, scores: list[float] | None) -> Tokenizer:
    """Llama 2 style: BPE over characters, "▁" for space, unknown characters spelled as <0xNN> byte tokens."""
    vocab = {token: index for index, token in enumerate(tokens)}
    if merges is None:
        # Sentencepiece files store a score per token instead of merges. A merge is every split of a token
        # into two tokens, ranked by the whole token's score, longer left and right parts first on ties.
        token_scores = dict(zip(tokens, scores))
        ranked = []
        for token, score in token_scores.items():
            splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
            ranked += [(left, right, score) for left, right in sorted(splits, key=lambda s: (vocab[s[0]], vocab[s[1]]))]
        ranked.sort(key=lambda merge: (merge[2], len(merge[0]), len(merge[1])), reverse=True)
        merge_pairs = [(left, right) for left, right, _ in ranked]
    else:
        merge_pairs = [tuple(merge.split(" ")) for merge in merges]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=True, byte_fallback=True, dropout=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    )
    return tokenizer


def _bos_eos_template(tokenizer: Tokenizer, named: dict, add_bos: bool, add_eos: bool) -> processors.TemplateProcessing:
    """The post-processor that puts BOS/EOS around each encoded text, laid out as transformers writes it."""
    bos, eos = named.get("bos_token"), named.get("eos_token")
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    special_tokens = [(token, tokenizer.token_to_id(token)) for token, add in [(bos, add_bos), (eos, add_eos)] if add]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special_tokens)


def _generation_config(metadata: dict) -> dict:
    # Chat models end a turn with an end-of-turn token that can differ from EOS (<|eot_id|> vs <|end_of_text|>),
    # so generation stops on any of them.
    stop_ids = [
        metadata[f"tokenizer.ggml.{key}_token_id"]
        for key in ("eos", "eot", "eom")
        if f"tokenizer.ggml.{key}_token_id" in metadata
    ]
    stop_ids = list(dict.fromkeys(stop_ids))  # unique, EOS first
    return {
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": stop_ids if len(stop_ids) > 1 else next(iter(stop_ids), None),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
    }


def _shortest_float(value: float) -> float:
    """A GGUF float32 as the shortest decimal that reads back the same (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
