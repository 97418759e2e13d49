"""Each family's tokenizer without the hub: its real normalizer, pre-tokenizer and merge rule, as its published
tokenizer.json spells them, put over SmolLM2's vocabulary and merges (the vocabulary is what exists offline; how
text is cut into words is the family's).
"""
import json
from pathlib import Path

from litllm.checkpoint import copy_tokenizer_files

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def split_then_bytes(regex: str) -> dict:
    """The pre-tokenizer of Llama 3, Qwen2 and Tekken tokenizer.json files: a regex split, then the byte alphabet."""
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


# name -> ((normalizer, pre_tokenizer, ignore_merges) or None for SmolLM2's own, the name llama.cpp gives the cut)
TOKENIZERS = {
    "smollm2": (None, "smollm"),
    "llama3": ((None, split_then_bytes(LLAMA3_REGEX), True), "llama-bpe"),
    "qwen2": (({"type": "NFC"}, split_then_bytes(QWEN2_REGEX), False), "qwen2"),  # Qwen2, Qwen2.5, Qwen3
    "tekken": ((None, split_then_bytes(TEKKEN_REGEX), True), "tekken"),  # Mistral Nemo and later
}
# tests/hf_models.py family -> the tokenizer its real checkpoints ship
FAMILY_TOKENIZERS = {"tied": "smollm2", "llama3-rope": "llama3", "mistral-sliding": "tekken", "qwen2": "qwen2",
                     "qwen2-yarn": "qwen2", "qwen3": "qwen2"}


def write_family_tokenizer(smollm2_dir: Path, out_dir: Path, tokenizer: str) -> None:
    """SmolLM2's tokenizer files in out_dir, with `tokenizer`'s normalizer, pre-tokenizer and merge rule."""
    copy_tokenizer_files(smollm2_dir, out_dir)
    if TOKENIZERS[tokenizer][0] is None:
        return
    normalizer, pre_tokenizer, ignore_merges = TOKENIZERS[tokenizer][0]
    spec = json.loads((out_dir / "tokenizer.json").read_text())
    spec["normalizer"], spec["pre_tokenizer"] = normalizer, pre_tokenizer
    spec["model"]["ignore_merges"] = ignore_merges
    (out_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))


def save_tiny_family(family: str, smollm2_dir: Path, out_dir: Path) -> Path:
    """A tiny random model of `family` with SmolLM2's 49152-token vocabulary and the family's tokenizer."""
    from hf_models import save_tiny_hf_model

    save_tiny_hf_model(family, out_dir, vocab_size=49152, hidden_size=64, intermediate_size=128,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    write_family_tokenizer(smollm2_dir, out_dir, FAMILY_TOKENIZERS[family])
    return out_dir


LLAMA2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def train_sentencepiece(out_dir: Path, corpus: list[Path], vocab_size: int = 2000, legacy: bool = True,
                        **options) -> Path:
    """A Llama 2 style tokenizer.model trained on the first 2,000 lines of each corpus file: sentencepiece BPE with
    byte fallback, digits split, no normalization; and its tokenizer_config.json (add BOS, Llama 2's chat format)."""
    import sentencepiece

    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [line for path in corpus for line in path.read_text(encoding="utf-8").splitlines()[:2000] if line.strip()]
    settings = dict(model_type="bpe", vocab_size=vocab_size, byte_fallback=True, split_digits=True,
                    normalization_rule_name="identity", remove_extra_whitespaces=False, character_coverage=0.99,
                    unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(out_dir / "tokenizer"),
                                             **{**settings, **options})
    (out_dir / "tokenizer.vocab").unlink()
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
              "add_eos_token": False, "legacy": legacy, "chat_template": LLAMA2_CHAT_TEMPLATE}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return out_dir / "tokenizer.model"


def save_tiny_sentencepiece_llama(out_dir: Path, corpus: list[Path], **options) -> Path:
    """A tiny random Llama with a Llama 2 style sentencepiece tokenizer (tokenizer.model only, as Llama 2 shipped)."""
    import sentencepiece
    from hf_models import save_tiny_hf_model

    model_file = train_sentencepiece(out_dir, corpus, **options)
    vocab_size = sentencepiece.SentencePieceProcessor(model_file=str(model_file)).get_piece_size()
    save_tiny_hf_model("llama", out_dir, vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=1, eos_token_id=2)
    return out_dir
