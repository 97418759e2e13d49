"""The pre-tokenizers llama.cpp knows by name (`tokenizer.ggml.pre`), each rebuilt with the `tokenizers` library.

A byte-level BPE tokenizer first cuts text into words (its pre-tokenizer), then runs BPE inside each word. A GGUF
does not store the cutting rule: llama.cpp keeps a fixed list of names, each with its regexes hard-coded in
`src/llama-vocab.cpp`, and refuses to load a file whose name is not on that list. So from_gguf builds, for a name,
the `tokenizers` pre-tokenizer that cuts like llama.cpp; and to_gguf names a tokenizer by what it does: it cuts
PROBE with the tokenizer's own normalizer and pre-tokenizer and with each of these, and writes the name whose cut is
identical. What a tokenizer.json spells differently but cuts the same way gets the same name; what cuts differently
from all of them gets no name, and is refused rather than written as a file llama.cpp would tokenize differently.

Names, regexes and flags are those of llama.cpp 0c1e570 (the copy llama-cpp-python 0.3.36 vendors).
"""
from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Regex, pre_tokenizers
from tokenizers.normalizers import Normalizer

# llama.cpp's regexes, in the Rust `regex` syntax `tokenizers` runs (llama.cpp rewrites some for its own engine,
# e.g. (?i:'s) as '[sS]; they match the same text).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizer:
    """One way llama.cpp cuts text: the name to_gguf writes for it, and the other names llama.cpp gives it."""

    name: str
    aliases: tuple[str, ...]
    # None: GPT-2's regex, which `tokenizers` applies inside ByteLevel(use_regex=True)
    split: str | None
    # every digit its own word before the split (SmolLM, StarCoder)
    digits_first: bool = False
    # a word that is a whole vocabulary token becomes that token, merges or not (Llama 3, Tekken); llama.cpp ties
    # this to the name, `tokenizers` keeps it in the BPE model
    ignore_merges: bool = False

    def build(self) -> pre_tokenizers.PreTokenizer:
        if self.split is None:
            steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        else:
            steps = [pre_tokenizers.Split(Regex(self.split), behavior="isolated"),
                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        if self.digits_first:
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
        return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


# Each distinct cut once; aliases only where llama.cpp sets the same regexes and the same ignore_merges.
PRE_TOKENIZERS = [
    PreTokenizer("gpt-2", ("phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum",
                           "modern-bert", "exaone4", "mpt", "olmo", "jais", "trillion", "granite-docling"), None),
    PreTokenizer("smollm", ("starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"), None,
                 digits_first=True),
    PreTokenizer("llama-bpe", ("llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                               "jina-v5-nano"), _LLAMA3_SPLIT, ignore_merges=True),
    PreTokenizer("smaug-bpe", ("dbrx",), _LLAMA3_SPLIT),
    PreTokenizer("qwen2", ("deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open"),
                 _QWEN2_SPLIT),
    PreTokenizer("qwen35", (), _QWEN35_SPLIT),
    PreTokenizer("tekken", (), _TEKKEN_SPLIT, ignore_merges=True),
    PreTokenizer("gpt-4o", ("llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
]
BY_NAME = {name: pre for pre in PRE_TOKENIZERS for name in (pre.name, *pre.aliases)}

# Text these cut differently from each other (tests check that every two do): contractions in both cases, digit runs
# of 1 to 7 and other scripts' digits, punctuation runs before letters and line ends, "/" after punctuation, runs of
# spaces, tabs and line ends (\r\n too), CamelCase, combining marks, Korean, Chinese, emoji, trailing spaces.
# All of it is NFC already, so the NFC normalizer of Qwen's tokenizer.json leaves it as it is.
PROBE = (
    "I'm sure you'LL SEE it's 'quoted' They've we'd DON'T\n"
    "1 12 123 1234 1234567 3.14159 -42 ½ ٣٤ x²\n"
    "  two  spaces\tand\t\ttabs \n\n\n three newlines\r\n\r\nCRLF   \n"
    "CamelCaseWords HTTPServer iPhone über ÜBER naïve क्षत्रिय\n"
    "hello!!! ... ?!/ -- /path/to/file.txt <tag> (a+b)*c={x};\n"
    "안녕하세요, 세계! 반갑습니다ㅋㅋ 你好，世界。 こんにちは 🤗🚀 \t  "
)


def cut(text: str, pre_tokenizer: pre_tokenizers.PreTokenizer | None,
        normalizer: Normalizer | None = None) -> list[str]:
    """The words a tokenizer hands to BPE for `text` (each spelled in the byte alphabet, space as "Ġ")."""
    if normalizer is not None:
        text = normalizer.normalize_str(text)
    if pre_tokenizer is None:
        return [text]
    return [word for word, _ in pre_tokenizer.pre_tokenize_str(text)]


def matching(pre_tokenizer: pre_tokenizers.PreTokenizer | None, normalizer: Normalizer | None) -> list[PreTokenizer]:
    """The llama.cpp pre-tokenizers that cut PROBE into the same words as this normalizer and pre-tokenizer."""
    words = cut(PROBE, pre_tokenizer, normalizer)
    return [pre for pre in PRE_TOKENIZERS if cut(PROBE, pre.build()) == words]
