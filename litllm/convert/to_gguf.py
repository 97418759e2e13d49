"""`litllm convert to_gguf`: a model dir (or a LoRA adapter, merged first) as one llama.cpp GGUF file."""
from __future__ import annotations

import json
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import sentencepiece
import tokenizers
import torch
from tqdm import tqdm

from litllm.checkpoint import check_checkpoint_dir, litllm_to_hf, load_model
from litllm.config import Config
from litllm.convert.from_gguf import BLOCK_TENSORS, MODEL_TENSORS
from litllm.convert.gguf_pre_tokenizers import PRE_TOKENIZERS, PROBE, matching
from litllm.convert.merge_lora import merged_model
from litllm.errors import UserError
from litllm.files import refuse_to_overwrite
from litllm.model import GPT
from litllm.tokenizer import Tokenizer as LitTokenizer


GGUF_DTYPES = {
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}


def to_gguf(checkpoint: Path, out_file: Path | None = None, dtype: str = "f16", base: Path | None = None,
            overwrite: bool = False) -> Path:
    """Write a model dir (or a LoRA adapter, merged into its base first) as one llama.cpp GGUF file.

    Args:
        checkpoint: a Hugging Face model dir, or a LoRA adapter dir.
        out_file: the .gguf file to write (default: <checkpoint>-<dtype>.gguf beside the checkpoint).
        dtype: f16, bf16, or q8_0 (8-bit blocks, about half the size of f16). Norms stay float32, as llama.cpp keeps them.
        base: for an adapter, its base checkpoint (default: the one the adapter names).
        overwrite: replace out_file if it exists.
    """
    checkpoint = Path(checkpoint)
    if dtype not in GGUF_DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(GGUF_DTYPES)}")
    out_file = Path(out_file) if out_file is not None else checkpoint.with_name(f"{checkpoint.name}-{dtype}.gguf")
    refuse_to_overwrite(out_file, overwrite)
    if (checkpoint / "adapter_config.json").is_file():
        model, model_dir = merged_model(checkpoint, base)
    else:
        model_dir = check_checkpoint_dir(checkpoint)
        model = load_model(model_dir, dtype=torch.float32)
    config = model.config
    if config.model_type not in ("llama", "mistral", "qwen2", "qwen3"):
        raise UserError(f"{model_dir}: model_type {config.model_type!r} cannot be exported to GGUF")
    arch = "llama" if config.model_type in ("llama", "mistral") else config.model_type
    _refuse_what_llama_cpp_runs_differently(config, arch, model_dir)
    if config.sliding_window is not None and config.sliding_window < config.max_seq_len:
        print(f"Note: llama.cpp's {arch} architecture has no sliding-window attention; the GGUF model attends to "
              f"all previous tokens, which equals this model's for prompts up to {config.sliding_window} tokens")
    has_tokenizer = (checkpoint / "tokenizer.json").is_file() or (checkpoint / "tokenizer.model").is_file()
    tokenizer_dir = checkpoint if has_tokenizer else model_dir

    out_file.parent.mkdir(parents=True, exist_ok=True)
    staging = out_file.with_name(f".{out_file.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        writer = gguf.GGUFWriter(staging, arch)
        writer.add_name(model_dir.name)
        _add_model_metadata(writer, config, GGUF_DTYPES[dtype][1])
        _add_tokenizer_metadata(writer, tokenizer_dir, config.vocab_size)
        for name, tensor in tqdm(_gguf_tensors(model, arch), desc="Writing GGUF", unit="tensor"):
            _add_tensor(writer, name, tensor, GGUF_DTYPES[dtype][0])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        staging.replace(out_file)
    finally:
        staging.unlink(missing_ok=True)
    print(f"Saved {out_file} ({dtype}, {out_file.stat().st_size / 1e6:.1f} MB)")
    return out_file


def _refuse_what_llama_cpp_runs_differently(config: Config, arch: str, model_dir: Path) -> None:
    """Stop before writing a model llama.cpp would refuse to load, or would run with other numbers than litllm."""
    if arch == "qwen2" and config.n_heads * config.head_dim != config.hidden_size:
        raise UserError(f"{model_dir}: llama.cpp's qwen2 needs num_attention_heads * head_dim == hidden_size "
                        f"({config.n_heads} * {config.head_dim} != {config.hidden_size})")
    scaling = config.rope_scaling or {"rope_type": "default"}
    if scaling["rope_type"] == "llama3" and arch != "llama":
        raise UserError(f"{model_dir}: llama.cpp reads Llama 3 RoPE scaling (the rope_freqs tensor) only for the llama "
                        f"architecture, not {arch}")
    # llama.cpp's YaRN takes beta_fast 32, beta_slow 1 and the attention factor 0.1 ln(factor) + 1, as transformers does
    # by default; other values would need keys litllm does not write
    unwritten = {key: value for key, value in scaling.items()
                 if key not in ("rope_type", "factor", "original_max_position_embeddings")
                 and (key, value) not in (("beta_fast", 32), ("beta_slow", 1))}
    if scaling["rope_type"] == "yarn" and unwritten:
        raise UserError(f"{model_dir}: YaRN RoPE with {unwritten} cannot be exported to GGUF (supported: factor and "
                        "original_max_position_embeddings, with beta_fast 32 and beta_slow 1)")


def _add_model_metadata(writer: gguf.GGUFWriter, config: Config, file_type: gguf.LlamaFileType) -> None:
    """The `<arch>.*` keys from_gguf's hf_config reads, from litllm's Config."""
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    scaling = config.rope_scaling or {"rope_type": "default"}
    if scaling["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif scaling["rope_type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(scaling.get("factor") or config.max_seq_len / scaling["original_max_position_embeddings"])
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
    # llama3 scaling is written as the `rope_freqs` tensor (see _gguf_tensors)


def llama_cpp_pre_tokenizer(tokenizer_file: Path) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for the way this tokenizer.json cuts text into words.

    Found by what the tokenizer does, not by how its file spells it (see gguf_pre_tokenizers): its normalizer and
    pre-tokenizer must cut a probe text exactly like one of llama.cpp's, with the same rule for whole-word tokens.
    """
    tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    ignore_merges = tokenizer.model.ignore_merges
    candidates = matching(tokenizer.pre_tokenizer, tokenizer.normalizer)
    for pre in candidates:
        if pre.ignore_merges == ignore_merges:
            return pre.name
    if candidates:
        raise UserError(f"{tokenizer_file}: it cuts words like llama.cpp's {candidates[0].name!r} pre-tokenizer, but "
                        f"{'ignores' if ignore_merges else 'applies'} BPE merges for words that are whole tokens, "
                        "which llama.cpp does not do with that pre-tokenizer; it would tokenize some words differently")
    if tokenizer.normalizer is not None and tokenizer.normalizer.normalize_str(PROBE) != PROBE:
        raise UserError(f"{tokenizer_file}: its normalizer rewrites text before tokenizing, which llama.cpp does not "
                        "do for a byte-level BPE vocabulary; it would tokenize text differently")
    raise UserError(f"{tokenizer_file}: its pre-tokenizer cuts text into words unlike every pre-tokenizer llama.cpp "
                    f"knows that litllm can name ({', '.join(pre.name for pre in PRE_TOKENIZERS)}); llama.cpp would "
                    "tokenize text differently")


def _add_tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer_dir: Path, n_embeddings: int) -> None:
    """The vocabulary in one of llama.cpp's two forms (byte-level BPE from tokenizer.json, or sentencepiece's from
    tokenizer.model), one entry per embedding row, then the special ids, whether BOS/EOS are added, and the chat
    template."""
    tokenizer = LitTokenizer(tokenizer_dir)
    json_file, sentencepiece_file = tokenizer_dir / "tokenizer.json", tokenizer_dir / "tokenizer.model"
    spec = json.loads(json_file.read_text(encoding="utf-8")) if json_file.is_file() else None
    if spec is not None and spec["model"]["type"] == "BPE" and not spec["model"].get("byte_fallback"):
        unk_id = _add_byte_level_vocabulary(writer, json_file, spec, n_embeddings)
    elif sentencepiece_file.is_file():
        unk_id = _add_sentencepiece_vocabulary(writer, sentencepiece_file, tokenizer, n_embeddings)
    else:
        kind = "no tokenizer.json" if spec is None else f"a {spec['model']['type']} tokenizer.json"
        raise UserError(f"{tokenizer_dir}: GGUF export needs a byte-level BPE tokenizer.json (Llama 3, Qwen, SmolLM, "
                        f"Mistral Tekken) or a sentencepiece tokenizer.model (Llama 2, Mistral v0.1); it has {kind} "
                        "and no tokenizer.model")

    named = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id, "unk": unk_id}
    for key, token_id in named.items():
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
    if other_stops := [i for i in tokenizer.stop_ids if i != tokenizer.eos_id]:
        writer.add_eot_token_id(other_stops[0])  # e.g. Llama 3's <|eot_id|>: llama.cpp stops on it as on EOS
    bare = tokenizer.encode("a", add_special_tokens=False)
    with_special = tokenizer.encode("a", add_special_tokens=True)
    writer.add_add_bos_token(tokenizer.bos_id is not None and with_special[:1] == [tokenizer.bos_id] != bare[:1])
    writer.add_add_eos_token(tokenizer.eos_id is not None and with_special[-1:] == [tokenizer.eos_id] != bare[-1:])
    if tokenizer.chat_template is not None:
        writer.add_chat_template(tokenizer.chat_template)


def _add_byte_level_vocabulary(writer: gguf.GGUFWriter, tokenizer_file: Path, spec: dict,
                               n_embeddings: int) -> int | None:
    """llama.cpp's "gpt2" vocabulary: tokens in the byte alphabet by id, their types, the merges, and the name of the
    pre-tokenizer. Returns the unknown token's id."""
    id_to_token = {index: token for token, index in spec["model"]["vocab"].items()}
    token_types = dict.fromkeys(id_to_token, gguf.TokenType.NORMAL)
    for added in spec.get("added_tokens", []):
        id_to_token[added["id"]] = added["content"]
        token_types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    if max(id_to_token) >= n_embeddings:
        raise UserError(f"{tokenizer_file}: token id {max(id_to_token)} has no embedding row (the model has "
                        f"{n_embeddings}); llama.cpp needs one row per token")
    # rows past the tokenizer (padding for speed) get placeholder tokens
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(llama_cpp_pre_tokenizer(tokenizer_file))
    writer.add_token_list([id_to_token.get(i, f"[PAD{i}]") for i in range(n_embeddings)])
    writer.add_token_types([token_types.get(i, gguf.TokenType.UNUSED) for i in range(n_embeddings)])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])])
    unk_token = spec["model"].get("unk_token")
    return {token: index for index, token in id_to_token.items()}.get(unk_token) if unk_token else None


def _add_sentencepiece_vocabulary(writer: gguf.GGUFWriter, model_file: Path, tokenizer: LitTokenizer,
                                  n_embeddings: int) -> int:
    """llama.cpp's "llama" vocabulary: sentencepiece's pieces with their scores and types, which llama.cpp merges by
    score as sentencepiece's BPE does. Returns the unknown piece's id.

    llama.cpp reproduces sentencepiece only for a BPE model with byte pieces and no text normalization, and it gives
    every text after a special token sentencepiece's leading "▁" (transformers' `legacy: true`); anything else is
    refused, as it would tokenize differently."""
    model = read_sentencepiece_model(model_file)
    if model.model_type != _SENTENCEPIECE_BPE:
        raise UserError(f"{model_file}: a sentencepiece {_SENTENCEPIECE_TYPES.get(model.model_type, 'unknown')} model; "
                        "llama.cpp's llama vocabulary reproduces sentencepiece's BPE models only")
    if model.normalization != "identity" or model.remove_extra_whitespaces:
        raise UserError(f"{model_file}: sentencepiece normalizes text ({model.normalization}"
                        f"{', removing extra whitespace' if model.remove_extra_whitespaces else ''}) and llama.cpp's "
                        "llama vocabulary does not; it would tokenize text differently")
    pieces = [piece for piece, _, _ in model.pieces]
    if not {f"<0x{byte:02X}>" for byte in range(256)} <= set(pieces):
        raise UserError(f"{model_file}: llama.cpp spells characters outside the vocabulary in byte pieces "
                        "(<0x00>..<0xFF>), which this sentencepiece model lacks (trained without byte_fallback)")
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    if tokenizer.encode(PROBE, add_special_tokens=False) != processor.encode(PROBE):
        raise UserError(f"{model_file.parent}: its tokenizer files disagree: tokenizer.json tokenizes text unlike "
                        "tokenizer.model, which is what a llama vocabulary holds")
    special_id = next(i for i in (tokenizer.bos_id, tokenizer.eos_id, processor.unk_id()) if i is not None)
    special = processor.id_to_piece(special_id)
    if tokenizer.encode(f"a{special}b", add_special_tokens=False) != \
            processor.encode("a") + [special_id] + processor.encode("b"):
        raise UserError(f"{model_file.parent}: text after a special token is tokenized without sentencepiece's "
                        "leading space (tokenizer_config.json `legacy: false`); llama.cpp always adds it, so chat "
                        "prompts would tokenize differently")
    if len(pieces) > n_embeddings:
        raise UserError(f"{model_file}: {len(pieces)} pieces but {n_embeddings} embedding rows; llama.cpp needs one "
                        "row per token")
    tokens, scores, types = list(pieces), [score for _, score, _ in model.pieces], [kind for _, _, kind in model.pieces]
    # Tokens added after the pieces (tokenizer_config.json's added_tokens_decoder); other rows are padding.
    for token_id in range(len(pieces), n_embeddings):
        content = tokenizer.decode([token_id])
        kind = gguf.TokenType.UNUSED if not content else gguf.TokenType.USER_DEFINED
        if content and not tokenizer.decode([token_id], skip_special_tokens=True):
            kind = gguf.TokenType.CONTROL
        tokens.append(content or f"[PAD{token_id}]")
        scores.append(-1000.0)  # never a merge result: llama.cpp matches added tokens whole, before merging
        types.append(kind)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(model.add_dummy_prefix)
    return processor.unk_id()


# sentencepiece's TrainerSpec.ModelType
_SENTENCEPIECE_TYPES = {1: "unigram", 2: "BPE", 3: "word", 4: "char"}
_SENTENCEPIECE_BPE = 2


@dataclass
class SentencePieceModel:
    """The fields of a tokenizer.model that a llama vocabulary needs (sentencepiece's Python API exposes neither the
    model type nor user-defined piece types)."""

    pieces: list[tuple[str, float, int]]  # piece, score, type (sentencepiece numbers types as GGUF does)
    model_type: int = 1
    normalization: str = "nmt_nfkc"
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True


def read_sentencepiece_model(path: Path) -> SentencePieceModel:
    """Read sentencepiece's ModelProto (sentencepiece_model.proto) from its protobuf encoding; defaults are the
    proto's."""
    try:
        fields = list(_protobuf_fields(path.read_bytes()))
        model = SentencePieceModel(pieces=[])
        for number, value in fields:
            if number == 1:  # SentencePiece: piece, score, type
                piece = dict(_protobuf_fields(value))
                model.pieces.append((piece[1].decode("utf-8"), struct.unpack("<f", piece.get(2, bytes(4)))[0],
                                     piece.get(3, gguf.TokenType.NORMAL)))
            elif number == 2:  # TrainerSpec
                model.model_type = dict(_protobuf_fields(value)).get(3, model.model_type)
            elif number == 3:  # NormalizerSpec
                spec = dict(_protobuf_fields(value))
                model.normalization = spec[1].decode("utf-8") if 1 in spec else model.normalization
                model.add_dummy_prefix = bool(spec.get(3, model.add_dummy_prefix))
                model.remove_extra_whitespaces = bool(spec.get(4, model.remove_extra_whitespaces))
                if spec.get(2):  # a precompiled character map normalizes whatever the rule is called
                    model.normalization += " with a precompiled character map"
    except (IndexError, KeyError, UnicodeDecodeError, struct.error):
        raise UserError(f"{path}: not a sentencepiece model") from None
    return model


def _protobuf_fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of each field of one protobuf message: varints as ints, everything else as bytes."""
    offset = 0

    def varint() -> int:
        nonlocal offset
        value = shift = 0
        while True:
            byte = data[offset]
            offset += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while offset < len(data):
        key = varint()
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            yield number, varint()
            continue
        size = {1: 8, 5: 4}.get(wire_type) if wire_type != 2 else varint()
        if size is None or offset + size > len(data):
            raise IndexError(f"protobuf wire type {wire_type} at byte {offset}")
        yield number, data[offset:offset + size]
        offset += size


def _gguf_tensors(model: GPT, arch: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) for every weight, in llama.cpp's layout."""
    config = model.config
    to_gguf_name = {hf: key for key, hf in BLOCK_TENSORS.items()}
    if config.rope_scaling and config.rope_scaling["rope_type"] == "llama3":
        # llama.cpp divides each RoPE frequency by this tensor's entry; litllm computed the scaled frequencies
        base = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim))
        yield "rope_freqs.weight", base / model.rope.inv_freq.float().cpu()
    for name, tensor in model.state_dict().items():
        if config.tie_embeddings and name == "lm_head.weight":
            continue  # llama.cpp uses token_embd for the output when `output` is absent
        hf_name = litllm_to_hf(name)
        stem, _, kind = hf_name.rpartition(".")
        if stem.startswith("model.layers."):
            _, _, layer, part = stem.split(".", 3)
            gguf_name = f"blk.{layer}.{to_gguf_name[part]}.{kind}"
        else:
            gguf_name = f"{_MODEL_TENSOR_NAMES[stem]}.{kind}"
        tensor = tensor.detach().float().cpu()
        if arch == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            n_heads = config.n_heads if ".attn_q." in gguf_name else config.n_kv_heads
            tensor = _permute_rotary_rows(tensor, n_heads)
        yield gguf_name, tensor


_MODEL_TENSOR_NAMES = {hf: key for key, hf in MODEL_TENSORS.items()}


def _permute_rotary_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of _unpermute_rotary_rows: each head's (first half, second half) rows interleaved in pairs."""
    head_dim = weight.shape[0] // n_heads
    halves = weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:])
    return halves.transpose(1, 2).reshape(weight.shape)


def _add_tensor(writer: gguf.GGUFWriter, name: str, tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> None:
    data = tensor.numpy()
    # vectors (norms, biases, rope_freqs) stay float32, as llama.cpp's converter keeps them; q8_0 needs rows
    # that split into 32-value blocks
    if data.ndim == 1 or (qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32):
        writer.add_tensor(name, data.astype(np.float32))
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
