"""Text <-> token ids for a Hugging Face checkpoint directory, and chat-template rendering.

One `Tokenizer` over either file a checkpoint ships: `tokenizer.json` (run by the `tokenizers` library) or, for old
Llama-2/Mistral-style checkpoints, only `tokenizer.model` (run by `sentencepiece`). The reference is transformers 5's
`AutoTokenizer`; transformers itself is never imported here. Where transformers 5 departs from the files, we follow
the files, because they are the tokenizer the model was trained with:

- transformers 5 rebuilds some classes (`GPT2Tokenizer`, `Qwen2Tokenizer`, `LlamaTokenizer`) from a hard-coded
  pipeline and keeps only the vocabulary, merges and post-processor of `tokenizer.json`; we run `tokenizer.json` as
  written. The two agree whenever the file holds the pipeline its class hard-codes (true of SmolLM2, Qwen2.5, Llama 3).
- For a sentencepiece-only checkpoint without `add_bos_token` in `tokenizer_config.json`, transformers 5 adds no BOS;
  we add it, as sentencepiece-era Llama tokenizers always did.
- Text that starts with a space: sentencepiece adds its dummy prefix anyway (" Hi" -> "▁", "▁Hi"); transformers 5's
  conversion does not. We keep sentencepiece's result.
"""

import itertools
import json
import re
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.runtime
import sentencepiece
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from litllm.errors import UserError

# The files a checkpoint's tokenizer and chat template live in (copied into every checkpoint litllm writes)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "generation_config.json", "added_tokens.json", "vocab.json", "merges.txt",
)
# The named special tokens of transformers (`SPECIAL_TOKENS_ATTRIBUTES`), in its order.
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    """The tokenizer of `checkpoint_dir`.

    `vocab_size` counts added tokens; `stop_ids` are the ids that end generation: `eos_id` and the
    `eos_token_id`(s) of generation_config.json (Llama 3 Instruct stops at both <|eot_id|> and <|end_of_text|>).
    """

    def __init__(self, checkpoint_dir: Path | str) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        if not self.checkpoint_dir.is_dir():
            raise UserError(f"{self.checkpoint_dir}: no such checkpoint directory")
        config = _read_json(self.checkpoint_dir / "tokenizer_config.json")
        # Legacy layout: transformers reads special_tokens_map.json only when tokenizer_config.json has no
        # added_tokens_decoder, and then lets it override tokenizer_config.json.
        if "added_tokens_decoder" not in config:
            config.update(_read_json(self.checkpoint_dir / "special_tokens_map.json"))

        json_file = self.checkpoint_dir / "tokenizer.json"
        sentencepiece_file = self.checkpoint_dir / "tokenizer.model"
        if json_file.is_file():
            named_tokens = _named_special_tokens(config)
            self._backend: _TokenizersBackend | _SentencePieceBackend = _TokenizersBackend(
                json_file, config, _tokens_to_add(config, named_tokens)
            )
        elif sentencepiece_file.is_file():
            processor = _load_sentencepiece(sentencepiece_file)
            # Like transformers, take bos/eos/unk from the model itself when the config does not name them.
            for name, piece_id in (("bos_token", processor.bos_id()), ("eos_token", processor.eos_id()),
                                   ("unk_token", processor.unk_id())):
                if name not in config and piece_id >= 0:
                    config[name] = processor.id_to_piece(piece_id)
            named_tokens = _named_special_tokens(config)
            # sentencepiece-era Llama tokenizers add BOS unless told not to (see the module docstring)
            add_bos, add_eos = config.get("add_bos_token", True), config.get("add_eos_token", False)
            self._backend = _SentencePieceBackend(
                processor,
                _tokens_to_add(config, named_tokens),
                bos_token=named_tokens["bos_token"]["content"] if add_bos and "bos_token" in named_tokens else None,
                eos_token=named_tokens["eos_token"]["content"] if add_eos and "eos_token" in named_tokens else None,
                # transformers 5's LlamaTokenizer default: no extra "▁" at the start of text after a special token
                legacy=config.get("legacy", False),
            )
        else:
            raise UserError(
                f"{self.checkpoint_dir} has neither tokenizer.json nor tokenizer.model; "
                "copy the tokenizer files of the checkpoint into it"
            )

        # Token strings the chat template sees as variables (`bos_token`, `eos_token`, ...).
        self._template_variables = {name: token["content"] for name, token in named_tokens.items()}
        self.bos_id = self._special_id(named_tokens, "bos_token")
        self.eos_id = self._special_id(named_tokens, "eos_token")
        self.pad_id = self._special_id(named_tokens, "pad_token")
        # what batches are padded with: the pad token, else EOS (the padded positions are never scored)
        self.padding_id = next((i for i in (self.pad_id, self.eos_id) if i is not None), 0)
        self.vocab_size = self._backend.vocab_size

        generation_config = _read_json(self.checkpoint_dir / "generation_config.json")
        extra_stop_ids = generation_config.get("eos_token_id")
        if not isinstance(extra_stop_ids, list):
            extra_stop_ids = [extra_stop_ids]
        # dict.fromkeys deduplicates and keeps the tokenizer's eos first
        self.stop_ids: list[int] = list(dict.fromkeys(i for i in [self.eos_id, *extra_stop_ids] if i is not None))
        self.chat_template = _read_chat_template(self.checkpoint_dir, config)

    def _special_id(self, named_tokens: dict[str, dict[str, Any]], name: str) -> int | None:
        return self.token_to_id(named_tokens[name]["content"]) if name in named_tokens else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render `messages` as transformers' `apply_chat_template(messages, tokenize=False, ...)` does.

        `kwargs` become template variables (`tools=[...]`, `enable_thinking=False`, ...) and override the special
        tokens of the same name.
        """
        # Like transformers: drop None values (OpenAI-style `content=None`), which many templates would render as
        # "None", and fill the reasoning field under each name templates read it by.
        messages = [_alias_reasoning({key: value for key, value in message.items() if value is not None})
                    for message in messages]
        variables = {"tools": None, "documents": None, **self._template_variables, **kwargs}
        try:
            return self._compiled_chat_template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.TemplateError as error:
            raise UserError(f"{self.checkpoint_dir}: chat template: {error}") from error
        except Exception as error:  # the template's own code failed on these messages (e.g. `1 / 0`, a bad key)
            raise UserError(f"{self.checkpoint_dir}: the chat template failed on these messages: "
                            f"{type(error).__name__}: {error}") from error

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # The template writes the special tokens (BOS included) itself, so none are added on top.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    @cached_property
    def _compiled_chat_template(self) -> jinja2.Template:
        if self.chat_template is None:
            raise UserError(
                f"{self.checkpoint_dir} has no chat template (no chat_template.jinja, no 'chat_template' in "
                "tokenizer_config.json); use a chat/instruct checkpoint or prompt without chat formatting"
            )
        try:
            return _jinja_environment().from_string(self.chat_template)
        except jinja2.TemplateSyntaxError as error:
            raise UserError(f"{self.checkpoint_dir}: chat template line {error.lineno}: {error.message}") from error


class _TokenizersBackend:
    """`tokenizer.json` through the `tokenizers` library, as transformers' TokenizersBackend runs it."""

    def __init__(self, path: Path, config: dict[str, Any], tokens_to_add: list[dict[str, Any]]) -> None:
        self.tokenizer = tokenizers.Tokenizer.from_file(str(path))
        # transformers switches truncation and padding stored in the file off for a call that does not ask for them.
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.tokenizer.encode_special_tokens = config.get("split_special_tokens", False)
        # transformers adds every special token the config names that tokenizer.json does not already hold as an
        # added token, in this order: it is then matched whole in text and skipped by skip_special_tokens.
        present = {token.content for token in self.tokenizer.get_added_tokens_decoder().values()}
        self.tokenizer.add_tokens([
            tokenizers.AddedToken(**{key: value for key, value in token.items() if key != "id"})
            for token in tokens_to_add if token["content"] not in present
        ])
        # Ignored by transformers 5 for BPE models, where it deletes real spaces before punctuation.
        self.clean_up_spaces = (
            config.get("clean_up_tokenization_spaces", False) and type(self.tokenizer.model).__name__ != "BPE"
        )
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        # BOS/EOS come from the file's post-processor alone: with a tokenizer.json, transformers 5 drops
        # add_bos_token/add_eos_token from tokenizer_config.json. encode_batch, unlike encode, lets go of the GIL
        # while it works: a server tokenizing a long prompt in a thread goes on answering meanwhile.
        return self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self.clean_up_spaces else text

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)


class _SentencePieceBackend:
    """`tokenizer.model` through sentencepiece, with added and special tokens matched in the text first, as
    transformers does (sentencepiece alone would spell "<s>" in text as the characters "<", "s", ">")."""

    # A private-use character no vocabulary holds: a byte-fallback model (every Llama/Mistral one) spells it in byte
    # pieces, which never merge with a neighbour, so encoding it in front of a text and cutting its ids off encodes
    # the text without the "▁" sentencepiece puts at the start of every input.
    NO_PREFIX_MARK = "\ue000"

    def __init__(self, processor: sentencepiece.SentencePieceProcessor, tokens_to_add: list[dict[str, Any]],
                 bos_token: str | None, eos_token: str | None, legacy: bool) -> None:
        self.processor = processor
        self.legacy = legacy
        self.added_tokens: dict[str, int] = {}
        self.special_ids: set[int] = set()
        # Control pieces (<s>, </s>) and the unk piece render as text and count as special, as in transformers.
        for piece_id in range(processor.get_piece_size()):
            if processor.is_control(piece_id) or processor.is_unknown(piece_id):
                self.added_tokens[processor.id_to_piece(piece_id)] = piece_id
                self.special_ids.add(piece_id)
        next_id = processor.get_piece_size()
        for token in tokens_to_add:
            token_id = self.added_tokens.get(token["content"], self.piece_to_id(token["content"]))
            if token_id is None:
                token_id = token.get("id", next_id)
            next_id = max(next_id, token_id + 1)
            self.added_tokens[token["content"]] = token_id
            if token["special"]:
                self.special_ids.add(token_id)
        self.added_token_by_id = {token_id: content for content, token_id in self.added_tokens.items()}
        # Longest first, so that the regex, which takes the first alternative that matches, matches the longest token.
        self.added_token_pattern = re.compile(
            "|".join(re.escape(content) for content in sorted(self.added_tokens, key=len, reverse=True))
        )
        self.no_prefix_mark_length = len(processor.encode(self.NO_PREFIX_MARK))
        self.vocab_size = max(processor.get_piece_size(), next_id)
        # what encode(add_special_tokens=True) puts around the text
        self.bos_id = self.token_to_id(bos_token) if bos_token is not None else None
        self.eos_id = self.token_to_id(eos_token) if eos_token is not None else None

    def piece_to_id(self, piece: str) -> int | None:
        piece_id = self.processor.piece_to_id(piece)
        # sentencepiece answers the unk id for a piece it does not know
        return piece_id if self.processor.id_to_piece(piece_id) == piece else None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = []
        start = 0
        for match in self.added_token_pattern.finditer(text):
            ids += self._encode_plain(text[start:match.start()], at_text_start=start == 0)
            ids.append(self.added_tokens[match.group()])
            start = match.end()
        ids += self._encode_plain(text[start:], at_text_start=start == 0)
        if add_special_tokens:
            ids = [self.bos_id] * (self.bos_id is not None) + ids + [self.eos_id] * (self.eos_id is not None)
        return ids

    def _encode_plain(self, text: str, at_text_start: bool) -> list[int]:
        """Encode text that holds no added token; after a special token, non-legacy tokenizers add no "▁"."""
        if not text:
            return []
        if at_text_start or self.legacy:
            return self.processor.encode(text)
        return self.processor.encode(self.NO_PREFIX_MARK + text)[self.no_prefix_mark_length:]

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        parts: list[str] = []
        for is_added, group in itertools.groupby(ids, key=lambda token_id: token_id in self.added_token_by_id):
            if is_added:
                parts += [self.added_token_by_id[token_id] for token_id in group
                          if not (skip_special_tokens and token_id in self.special_ids)]
                continue
            # ids the tokenizer does not know (padded embedding rows) decode to nothing, as in `tokenizers`
            pieces = [token_id for token_id in group if 0 <= token_id < self.processor.get_piece_size()]
            if not pieces:
                continue
            # Decoded together, so that byte pieces join into characters.
            text = self.processor.decode(pieces)
            # sentencepiece drops the "▁" that starts every decode; transformers drops it only at the very start.
            if parts and self.processor.id_to_piece(pieces[0]).startswith("▁"):
                text = " " + text
            parts.append(text)
        return "".join(parts)

    def token_to_id(self, token: str) -> int | None:
        return self.added_tokens[token] if token in self.added_tokens else self.piece_to_id(token)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"{path}:{error.lineno}: invalid JSON: {error.msg}") from error
    if not isinstance(content, dict):
        raise UserError(f"{path}: expected a JSON object, found a {type(content).__name__}; fix or re-download it")
    return content


def _load_sentencepiece(path: Path) -> sentencepiece.SentencePieceProcessor:
    try:
        return sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as error:
        raise UserError(
            f"{path} is not a sentencepiece model (a tiktoken file?); use the checkpoint's tokenizer.json instead"
        ) from error


def _token_spec(value: Any) -> dict[str, Any] | None:
    """A token as written in tokenizer_config.json ("<s>" or {"content": "<s>", "lstrip": ...}) -> AddedToken kwargs."""
    if isinstance(value, str):
        return {"content": value}
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        keys = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")
        return {key: value[key] for key in keys if key in value}
    return None


def _named_special_tokens(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """bos_token, eos_token, ... plus the model-specific `*_token` keys (e.g. `image_token`), as transformers names
    them; a token set to null is left out."""
    extra = config.get("extra_special_tokens")
    candidates = {**config, **(extra if isinstance(extra, dict) else {})}
    names = [*NAMED_SPECIAL_TOKENS, *(name for name in candidates
                                      if name.endswith("_token") and name not in NAMED_SPECIAL_TOKENS)]
    named = {name: _token_spec(candidates.get(name)) for name in names}
    return {name: {**spec, "special": True} for name, spec in named.items() if spec is not None}


def _tokens_to_add(config: dict[str, Any], named_tokens: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every token transformers makes an added token, in its order: the config's added_tokens_decoder by id, the named
    special tokens, then the extra (formerly additional) special tokens."""
    tokens = []
    for token_id, value in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda item: int(item[0])):
        spec = _token_spec(value)
        if spec is not None:
            tokens.append({"special": False, **spec, "id": int(token_id)})
    tokens += named_tokens.values()
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(extra, list):
        tokens += [{**spec, "special": True} for spec in map(_token_spec, extra) if spec is not None]
    unique: dict[str, dict[str, Any]] = {}
    for token in tokens:
        unique.setdefault(token["content"], token)
    return list(unique.values())


def _read_chat_template(checkpoint_dir: Path, config: dict[str, Any]) -> str | None:
    # transformers 5 saves the template as chat_template.jinja, which wins over the older tokenizer_config.json key.
    template_file = checkpoint_dir / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        templates = {entry["name"]: entry["template"] for entry in template}
        if "default" not in templates:
            raise UserError(
                f"{checkpoint_dir / 'tokenizer_config.json'}: chat_template lists {sorted(templates)} but no 'default'"
            )
        return templates["default"]
    return template


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = next((message[key] for key in ("reasoning_content", "thinking", "reasoning") if key in message), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for transformers' assistant masks; here it
    renders its body, so templates that use it render as they do in transformers."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: jinja2.runtime.Macro) -> str:
        return caller()


def _jinja_environment() -> ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in: templates come from the Hub, so they run sandboxed."""
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        # Jinja's own tojson escapes HTML characters (<, >, &, ') and so would change the prompt.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    return environment


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`: remove the spaces WordPiece-style decoding puts before punctuation."""
    for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                           (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(spaced, joined)
    return text
