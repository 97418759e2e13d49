"""litllm's Tokenizer against transformers' AutoTokenizer on the same checkpoint files.

The checkpoints are built here, with the layouts and pipelines of real Hub tokenizers (SmolLM2, Qwen2.5, Llama 3,
and a sentencepiece-only Llama 2), trained on a little of the shared English and Korean text.
"""
import io
import json
from functools import cache
from pathlib import Path

import pytest
import sentencepiece
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer
from transformers import AutoTokenizer, GenerationConfig, TokenizersBackend

from litllm.errors import UserError
from litllm.tokenizer import Tokenizer

DATA = Path(__file__).resolve().parents[1] / "data"  # the demo data bundled in the repo
SHAKESPEARE = (DATA / "tiny_shakespeare.txt").read_text(encoding="utf-8")
KOREAN = (DATA / "ko_nsmc_reviews.txt").read_text(encoding="utf-8")
ALPACA = json.loads((DATA / "alpaca_demo.json").read_text(encoding="utf-8"))
# English, Korean, and Alpaca answers for the numbers, so that the tokenizers learn merges of digits.
CORPUS = [line for line in (SHAKESPEARE[:100_000] + KOREAN[:60_000]).splitlines() if line.strip()] + [
    example["output"] for example in ALPACA
]

TEXTS = [
    "Hello world! How are you?",
    SHAKESPEARE[300_000:301_000],  # text none of the tokenizers was trained on
    KOREAN[300_000:300_600],
    "전체관람가는 아닌것 같아요. 정말 재밌어요!",
    "Year 2024: 1234567 apples, 3.14159 pies and 1,000,000 ways",
    "tabs\tand\n\nnewlines   and    runs of spaces  \n",
    "mixed 한국어 and English 123 in one line",
    "emoji 🦙 and accents: café naïve ﬁ",
    "  starts with spaces",
    "",
]


def special_token_text(hf) -> str:
    """Special tokens inside text, with and without spaces around them."""
    bos, eos = hf.bos_token or "", hf.eos_token
    return f"{bos}Hi there{eos}and {eos}\n{eos}done{bos}"


# The chat templates as on the Hub.
SMOLLM2_TEMPLATE = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"  # noqa: E501

LLAMA3_TEMPLATE = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"  # noqa: E501

LLAMA2_TEMPLATE = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"  # noqa: E501

QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501

QWEN_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501

CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris. 파리는 프랑스의 수도입니다.  "},
    {"role": "user", "content": "  And of Korea?\n"},
]
SYSTEM = {"role": "system", "content": "You are a terse assistant."}


def train_byte_level_bpe(pre_tokenizer, leading_special_tokens=(), normalizer=None) -> HFTokenizer:
    tokenizer = HFTokenizer(models.BPE())
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=list(leading_special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def write_checkpoint(directory: Path, tokenizer_config: dict, model_type: str, tokenizer: HFTokenizer | None = None,
                     sentencepiece_model: bytes | None = None, chat_template_file: str | None = None,
                     generation_config: dict | None = None) -> Path:
    """A Hub-style checkpoint directory holding only what the tokenizer reads (and config.json, which
    AutoTokenizer reads to pick the tokenizer class)."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": model_type}))
    if tokenizer is not None:
        tokenizer.save(str(directory / "tokenizer.json"))
        tokenizer_config = {"added_tokens_decoder": {
            str(token_id): {"content": token.content, "lstrip": token.lstrip, "normalized": token.normalized,
                            "rstrip": token.rstrip, "single_word": token.single_word, "special": token.special}
            for token_id, token in tokenizer.get_added_tokens_decoder().items()
        }, **tokenizer_config}
    if sentencepiece_model is not None:
        (directory / "tokenizer.model").write_bytes(sentencepiece_model)
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, ensure_ascii=False, indent=2))
    if chat_template_file is not None:
        (directory / "chat_template.jinja").write_text(chat_template_file)
    if generation_config is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation_config))
    return directory


def smollm2_tokenizer() -> HFTokenizer:
    # SmolLM2: special tokens first, digits split one by one before byte-level BPE.
    return train_byte_level_bpe(
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
        leading_special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    )


def smollm2_config(**overrides) -> dict:
    return {
        "tokenizer_class": "GPT2Tokenizer", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>",
        "<|im_end|>"], "add_prefix_space": False, "clean_up_tokenization_spaces": False, "model_max_length": 8192,
        "chat_template": SMOLLM2_TEMPLATE, **overrides,
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    smollm2 = smollm2_tokenizer()

    # Qwen2.5: NFC, its split regex then byte-level BPE; special tokens after the vocabulary, no BOS.
    qwen = train_byte_level_bpe(
        pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
        normalizer=normalizers.NFC(),
    )
    qwen.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    qwen.add_tokens([AddedToken("<tool_call>", special=False), AddedToken("</tool_call>", special=False)])
    qwen.post_processor = processors.ByteLevel(trim_offsets=False)

    # Llama 3: tiktoken-style regex, special tokens after the vocabulary, BOS added by the post-processor.
    llama3 = train_byte_level_bpe(
        pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
    )
    llama3.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                               "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    llama3.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
            special_tokens=[("<|begin_of_text|>", llama3.token_to_id("<|begin_of_text|>"))],
        ),
    ])

    # Llama 2: only tokenizer.model, a byte-fallback BPE sentencepiece model without normalization.
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=2000, model_type="bpe", byte_fallback=True,
        split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2,
    )

    def llama2_config(**overrides) -> dict:
        added = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        return {
            "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
            "added_tokens_decoder": {str(i): {"content": c, **added} for i, c in enumerate(["<unk>", "<s>", "</s>"])},
            "bos_token": {"__type": "AddedToken", "content": "<s>", **added},
            "eos_token": {"__type": "AddedToken", "content": "</s>", **added},
            "unk_token": {"__type": "AddedToken", "content": "<unk>", **added},
            "pad_token": None, "clean_up_tokenization_spaces": False, "sp_model_kwargs": {},
            "chat_template": LLAMA2_TEMPLATE, **overrides,
        }

    sentencepiece_model = model.getvalue()
    return {
        "smollm2": write_checkpoint(root / "smollm2", smollm2_config(), "llama", tokenizer=smollm2,
                                    generation_config={"bos_token_id": 1, "eos_token_id": 2}),
        "qwen2.5": write_checkpoint(
            root / "qwen2.5",
            {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
             "pad_token": "<|endoftext|>", "unk_token": None, "add_bos_token": False, "add_prefix_space": False,
             "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "errors": "replace",
             "split_special_tokens": False, "clean_up_tokenization_spaces": False},
            "qwen2", tokenizer=qwen, chat_template_file=QWEN25_TEMPLATE,
            generation_config={"eos_token_id": [qwen.token_to_id("<|im_end|>"), qwen.token_to_id("<|endoftext|>")]},
        ),
        "llama3": write_checkpoint(
            root / "llama3",
            # Llama 3 ships clean_up_tokenization_spaces=true, which transformers 5 ignores for BPE tokenizers.
            {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
             "clean_up_tokenization_spaces": True, "model_input_names": ["input_ids", "attention_mask"],
             "chat_template": LLAMA3_TEMPLATE},
            "llama", tokenizer=llama3,
            generation_config={"bos_token_id": llama3.token_to_id("<|begin_of_text|>"), "eos_token_id": [
                llama3.token_to_id("<|end_of_text|>"), llama3.token_to_id("<|eot_id|>")]},
        ),
        "llama2-sentencepiece": write_checkpoint(root / "llama2-sentencepiece", llama2_config(), "llama",
                                                 sentencepiece_model=sentencepiece_model),
        "sentencepiece-legacy": write_checkpoint(root / "sentencepiece-legacy", llama2_config(legacy=True), "llama",
                                                 sentencepiece_model=sentencepiece_model),
        "sentencepiece-eos": write_checkpoint(root / "sentencepiece-eos", llama2_config(add_eos_token=True), "llama",
                                              sentencepiece_model=sentencepiece_model),
        "sentencepiece-no-bos": write_checkpoint(root / "sentencepiece-no-bos", llama2_config(add_bos_token=False),
                                                 "llama", sentencepiece_model=sentencepiece_model),
    }


@cache
def transformers_tokenizer(directory: Path):
    return AutoTokenizer.from_pretrained(directory)


STYLES = ["smollm2", "qwen2.5", "llama3", "llama2-sentencepiece", "sentencepiece-legacy", "sentencepiece-eos",
          "sentencepiece-no-bos"]


def texts_for(style: str, hf) -> list[str]:
    texts = [*TEXTS, special_token_text(hf)]
    if "sentencepiece" in style:
        # transformers 5 drops sentencepiece's "▁" before a leading space: test_sentencepiece_keeps_dummy_prefix...
        texts = [text for text in texts if not text.startswith(" ")]
    return texts


@pytest.mark.parametrize("style", STYLES)
def test_encode_matches_transformers(checkpoints, style):
    hf = transformers_tokenizer(checkpoints[style])
    tokenizer = Tokenizer(checkpoints[style])
    for text in texts_for(style, hf):
        assert tokenizer.encode(text) == hf(text)["input_ids"], text
        assert tokenizer.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False), text


@pytest.mark.parametrize("style", STYLES)
def test_decode_matches_transformers(checkpoints, style):
    hf = transformers_tokenizer(checkpoints[style])
    tokenizer = Tokenizer(checkpoints[style])
    id_lists = [hf(text)["input_ids"] for text in texts_for(style, hf)]
    # Arbitrary ids too: lone byte-level pieces that are not valid UTF-8, special tokens in the middle.
    arbitrary = [list(range(start, len(hf), 37)) for start in range(5)]
    if "sentencepiece" in style:
        # Byte-fallback pieces that are not valid UTF-8: test_sentencepiece_decodes_invalid_bytes_as_sentencepiece
        processor = sentencepiece.SentencePieceProcessor(model_file=str(checkpoints[style] / "tokenizer.model"))
        arbitrary = [[i for i in ids if i >= len(processor) or not processor.is_byte(i)] for ids in arbitrary]
    id_lists += arbitrary
    for ids in id_lists:
        for skip_special_tokens in (False, True):
            assert tokenizer.decode(ids, skip_special_tokens) == hf.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("style", STYLES)
def test_special_tokens_and_vocab_match_transformers(checkpoints, style):
    hf = transformers_tokenizer(checkpoints[style])
    tokenizer = Tokenizer(checkpoints[style])
    assert tokenizer.vocab_size == len(hf)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (hf.bos_token_id, hf.eos_token_id,
                                                                      hf.pad_token_id)
    for token, token_id in [*hf.get_added_vocab().items(), *list(hf.get_vocab().items())[::50]]:
        assert tokenizer.token_to_id(token) == token_id
    assert tokenizer.token_to_id("not a token of this vocabulary") is None


@pytest.mark.parametrize("style", ["smollm2", "qwen2.5", "llama3", "llama2-sentencepiece", "sentencepiece-legacy"])
@pytest.mark.parametrize("with_system", [False, True], ids=["no-system", "system"])
@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["generation-prompt", "no-generation-prompt"])
def test_chat_template_matches_transformers(checkpoints, style, with_system, add_generation_prompt):
    hf = transformers_tokenizer(checkpoints[style])
    tokenizer = Tokenizer(checkpoints[style])
    messages = [SYSTEM, *CONVERSATION] if with_system else CONVERSATION
    if not add_generation_prompt:  # a finished conversation, as in training data
        messages = [*messages, {"role": "assistant", "content": "Seoul."}]
    expected = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    expected_ids = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, return_dict=False)
    assert tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt) == expected_ids


def test_chat_template_tools_render_as_json_like_transformers(checkpoints):
    """Tools reach the template as a variable; tojson keeps non-ASCII and <, >, & unescaped as transformers does."""
    hf = transformers_tokenizer(checkpoints["qwen2.5"])
    tokenizer = Tokenizer(checkpoints["qwen2.5"])
    tools = [{"type": "function", "function": {"name": "날씨", "description": "Weather <city> & co", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    messages = [*CONVERSATION, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "날씨", "arguments": {"city": "서울"}}}]},
        {"role": "tool", "content": "맑음, 21°C"}]
    expected = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    assert tokenizer.apply_chat_template(messages, tools=tools) == expected


def test_chat_template_read_from_either_layout(checkpoints, tmp_path):
    """chat_template.jinja (transformers 5), a tokenizer_config.json string, or a list of named templates."""
    tokenizer = smollm2_tokenizer()
    config = {key: value for key, value in smollm2_config().items() if key != "chat_template"}
    named = [{"name": "default", "template": SMOLLM2_TEMPLATE}, {"name": "tool_use", "template": "{{ tools }}"}]
    layouts = {
        "jinja-file": write_checkpoint(tmp_path / "jinja", config, "llama", tokenizer,
                                       chat_template_file=SMOLLM2_TEMPLATE),
        "config-string": write_checkpoint(tmp_path / "string", {**config, "chat_template": SMOLLM2_TEMPLATE}, "llama",
                                          tokenizer),
        "config-list": write_checkpoint(tmp_path / "list", {**config, "chat_template": named}, "llama", tokenizer),
        # the file wins over the config key
        "both": write_checkpoint(tmp_path / "both", {**config, "chat_template": "{{ 'stale' }}"}, "llama", tokenizer,
                                 chat_template_file=SMOLLM2_TEMPLATE),
    }
    for layout, directory in layouts.items():
        expected = transformers_tokenizer(directory).apply_chat_template(CONVERSATION, add_generation_prompt=True,
                                                                         tokenize=False)
        assert expected.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"), layout
        assert Tokenizer(directory).apply_chat_template(CONVERSATION) == expected, layout


# Block tags on their own lines (trim_blocks, lstrip_blocks), loop controls, {% generation %}, `tools` defaulting to
# none, fields set to None, the reasoning field under another name, strftime_now.
FEATURES_TEMPLATE = """{% if tools is not none %}Tools: {{ tools | tojson }}
{% endif %}
{% for message in messages %}
    {% if message.role == 'system' %}
        {% continue %}
    {% endif %}
    {% if message.role == 'assistant' %}
        {% generation %}
<think>{{ message.reasoning_content }}</think>{{ message.content }}{{ eos_token }}
        {% endgeneration %}
    {% else %}
{{ message.role }} ({{ message.name }}): {{ message.content }}
    {% endif %}
    {% if loop.index == 4 %}
        {% break %}
    {% endif %}
{% endfor %}
Year {{ strftime_now('%Y') }}
"""


def test_template_features_render_like_transformers(tmp_path):
    directory = write_checkpoint(tmp_path / "features", smollm2_config(chat_template=FEATURES_TEMPLATE), "llama",
                                 smollm2_tokenizer())
    hf = transformers_tokenizer(directory)
    messages = [SYSTEM, {"role": "user", "content": "hi", "name": None},
                {"role": "assistant", "content": "hello", "thinking": "be brief"}, *CONVERSATION]
    for kwargs in ({}, {"tools": [{"name": "search"}]}):
        expected = hf.apply_chat_template(messages, add_generation_prompt=False, tokenize=False, **kwargs)
        assert Tokenizer(directory).apply_chat_template(messages, add_generation_prompt=False, **kwargs) == expected


def test_raise_exception_in_template_is_a_user_error(checkpoints):
    messages = [{"role": "user", "content": "hi"}, {"role": "user", "content": "hi again"}]
    with pytest.raises(Exception, match="roles must alternate"):  # transformers raises jinja2's TemplateError
        transformers_tokenizer(checkpoints["llama2-sentencepiece"]).apply_chat_template(messages, tokenize=False)
    with pytest.raises(UserError, match="roles must alternate"):
        Tokenizer(checkpoints["llama2-sentencepiece"]).apply_chat_template(messages)


def test_stop_ids_are_eos_and_generation_config_eos_ids(checkpoints):
    for style in ("smollm2", "qwen2.5", "llama3"):
        hf = transformers_tokenizer(checkpoints[style])
        generation_eos = GenerationConfig.from_pretrained(checkpoints[style]).eos_token_id
        generation_eos = generation_eos if isinstance(generation_eos, list) else [generation_eos]
        assert Tokenizer(checkpoints[style]).stop_ids == list(dict.fromkeys([hf.eos_token_id, *generation_eos]))
    # without generation_config.json, the eos token alone
    assert Tokenizer(checkpoints["llama2-sentencepiece"]).stop_ids == [
        transformers_tokenizer(checkpoints["llama2-sentencepiece"]).eos_token_id]
    # Llama 3 Instruct stops at <|eot_id|> (its eos) and at <|end_of_text|> (from generation_config.json).
    llama3 = Tokenizer(checkpoints["llama3"])
    assert llama3.stop_ids == [llama3.token_to_id("<|eot_id|>"), llama3.token_to_id("<|end_of_text|>")]


def test_add_bos_token_is_ignored_when_tokenizer_json_exists(checkpoints, tmp_path):
    """transformers 5 takes BOS/EOS from tokenizer.json's post-processor and drops add_bos_token/add_eos_token."""
    for style, overrides in (("llama3", {"add_bos_token": False}), ("qwen2.5", {"add_bos_token": True,
                                                                               "add_eos_token": True})):
        directory = tmp_path / style
        directory.mkdir()
        for file in checkpoints[style].iterdir():
            (directory / file.name).write_bytes(file.read_bytes())
        config = json.loads((directory / "tokenizer_config.json").read_text())
        (directory / "tokenizer_config.json").write_text(json.dumps({**config, **overrides}))
        text = "Hello world"
        assert Tokenizer(directory).encode(text) == transformers_tokenizer(directory)(text)["input_ids"], style


def test_tokenizer_json_is_run_as_written_even_where_transformers_5_rebuilds_the_class(tmp_path):
    """AutoTokenizer builds a `GPT2Tokenizer` from its hard-coded pipeline and keeps only the vocabulary and merges
    of tokenizer.json, here losing the NFC normalizer; litllm runs the file, as transformers' TokenizersBackend does."""
    nfc = train_byte_level_bpe(
        pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
        normalizer=normalizers.NFC(),
    )
    directory = write_checkpoint(tmp_path / "nfc", {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>"},
                                 "llama", nfc)
    file_faithful = TokenizersBackend.from_pretrained(directory)
    tokenizer = Tokenizer(directory)
    for text in ("cafe\u0301 re\u0301sume\u0301", "\u1100\u1161 한", *TEXTS):
        assert tokenizer.encode(text) == file_faithful(text)["input_ids"], text


def test_special_tokens_missing_from_tokenizer_json_are_added_like_transformers(tmp_path):
    """A pad token named only in tokenizer_config.json becomes a new special token, matched whole in text."""
    mask = {"__type": "AddedToken", "content": "<mask>", "lstrip": True, "normalized": False, "rstrip": False,
            "single_word": False}
    directory = write_checkpoint(tmp_path / "pad", smollm2_config(pad_token="<pad>", mask_token=mask), "llama",
                                 smollm2_tokenizer())
    hf = transformers_tokenizer(directory)
    tokenizer = Tokenizer(directory)
    assert (tokenizer.vocab_size, tokenizer.pad_id) == (len(hf), hf.pad_token_id)
    text = "padded<pad><pad> and masked <mask> end"
    assert tokenizer.encode(text) == hf(text)["input_ids"]
    ids = hf(text)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


def test_special_tokens_map_json_is_read_for_old_checkpoints(tmp_path):
    """Without added_tokens_decoder in tokenizer_config.json, special_tokens_map.json names the special tokens."""
    tokenizer = smollm2_tokenizer()
    directory = write_checkpoint(tmp_path / "old", {}, "llama", tokenizer)
    config = {"tokenizer_class": "GPT2Tokenizer", "chat_template": SMOLLM2_TEMPLATE}  # no added_tokens_decoder
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": {"content": "<|im_start|>", "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False}, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    hf = transformers_tokenizer(directory)
    ours = Tokenizer(directory)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)


def test_sentencepiece_keeps_dummy_prefix_before_leading_space(checkpoints):
    """A text starting with a space encodes as sentencepiece encodes it (the model was trained so); transformers 5's
    conversion to `tokenizers` differs here only."""
    directory = checkpoints["llama2-sentencepiece"]
    processor = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    tokenizer = Tokenizer(directory)
    for text in ("  starts with spaces", " x", "   "):
        assert tokenizer.encode(text) == [processor.bos_id(), *processor.encode(text)]
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == processor.decode(
            processor.encode(text))


def test_sentencepiece_decodes_invalid_bytes_as_sentencepiece(checkpoints):
    """Byte pieces that do not form UTF-8 decode as sentencepiece decodes them: only the bad bytes become U+FFFD
    (transformers 5's ByteFallback turns every byte of the run into U+FFFD, "a" included)."""
    directory = checkpoints["llama2-sentencepiece"]
    processor = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    byte_ids = [processor.piece_to_id(f"<0x{byte:02X}>") for byte in "a한".encode()]
    tokenizer = Tokenizer(directory)
    for ids in (byte_ids[:2], byte_ids[:3], byte_ids[2:], [processor.piece_to_id("▁the"), *byte_ids[:2]]):
        assert tokenizer.decode(ids) == processor.decode(ids)
        assert "\ufffd" in tokenizer.decode(ids)


def test_sentencepiece_adds_bos_when_config_does_not_say(checkpoints, tmp_path):
    """Old checkpoints without add_bos_token get BOS, as sentencepiece Llama tokenizers always did (transformers 5
    adds none there): the same ids as transformers with add_bos_token=true."""
    directory = tmp_path / "no-key"
    directory.mkdir()
    (directory / "tokenizer.model").write_bytes((checkpoints["llama2-sentencepiece"] / "tokenizer.model").read_bytes())
    text = "Hello world"
    assert Tokenizer(directory).encode(text) == transformers_tokenizer(checkpoints["llama2-sentencepiece"])(text)[
        "input_ids"]


def test_directory_without_tokenizer_files_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="neither tokenizer.json nor tokenizer.model") as error:
        Tokenizer(tmp_path)
    assert str(tmp_path) in str(error.value)
    with pytest.raises(UserError, match="no such checkpoint directory"):
        Tokenizer(tmp_path / "missing")


def test_chat_without_template_is_a_user_error(checkpoints, tmp_path):
    directory = write_checkpoint(tmp_path / "base", {"eos_token": "<|endoftext|>"}, "llama", smollm2_tokenizer())
    tokenizer = Tokenizer(directory)
    assert tokenizer.chat_template is None
    assert tokenizer.encode("no chat needed") == transformers_tokenizer(directory)("no chat needed")["input_ids"]
    with pytest.raises(UserError, match="has no chat template") as error:
        tokenizer.encode_chat(CONVERSATION)
    assert str(directory) in str(error.value)
