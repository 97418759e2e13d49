"""Fine-tuning data on real files, with transformers' chat templating and assistant masks as the oracle."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from litllm.data import IGNORE_INDEX, JSON, Alpaca, Chat, alpaca_prompt, read_rows
from litllm.errors import UserError
from litllm.tokenizer import Tokenizer

DATA = Path(__file__).parents[1] / "data"
ALPACA = DATA / "alpaca_demo.json"
KOREAN = DATA / "ko_chatbot_demo.json"
CHAT = DATA / "chat_demo.jsonl"

# SmolLM2's own template with {% generation %} around each assistant reply and its end-of-turn token: transformers
# then returns the assistant mask we compare labels with. It renders the same text as the original.
SMOLLM2_TEMPLATE_WITH_GENERATION_TAGS = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Like Qwen3: the last assistant turn gets an (empty) reasoning block the earlier ones do not, so a conversation's
# rendering does not start with the rendering of its first turns.
LAST_TURN_DIFFERS_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{% if loop.last %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tokenizer_dir(smollm2_dir: Path, directory: Path, chat_template: str | None) -> Path:
    """SmolLM2's tokenizer files with another chat template (or none)."""
    directory.mkdir()
    shutil.copy(smollm2_dir / "tokenizer.json", directory)
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if chat_template is not None:
        (directory / "chat_template.jinja").write_text(chat_template)
    return directory


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir) -> Tokenizer:
    return Tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def hf_masking_tokenizer(smollm2_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("tagged") / "tokenizer"
    tokenizer_dir(smollm2_dir, directory, SMOLLM2_TEMPLATE_WITH_GENERATION_TAGS)
    return AutoTokenizer.from_pretrained(directory)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def first_rows(path: Path, count: int) -> list[dict]:
    return [row for _, row in list(read_rows(path))[:count]]


def everything(data, tokenizer, max_seq_length=4096):
    """All examples of `data` in file order (no validation split)."""
    data.val_split_fraction = 0.0
    train, _ = data.setup(tokenizer, max_seq_length)
    return [train[i] for i in range(len(train))]


def labelled_runs(labels: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of consecutive labelled positions."""
    runs, start = [], None
    for position, label in enumerate([*labels.tolist(), IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = position
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, position))
            start = None
    return runs


def assistant_mask(hf_tokenizer, messages: list[dict]) -> dict:
    """transformers' input_ids and assistant_masks (from the template's {% generation %} tags) for `messages`."""
    return hf_tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)


def user_message(row: dict) -> str:
    return f"{row['instruction']}\n\n{row['input']}" if row.get("input") else row["instruction"]


# ------------------------------------------------------------------------------------ instruction rows


def test_instruction_rows_are_the_chat_template_conversation_with_the_prompt_masked(
        tokenizer, hf_tokenizer, hf_masking_tokenizer, tmp_path):
    rows = first_rows(ALPACA, 40)
    assert any(row["input"] for row in rows) and any(not row["input"] for row in rows)
    examples = everything(JSON(json_path=write_jsonl(tmp_path / "rows.jsonl", rows)), tokenizer)

    for row, example in zip(rows, examples, strict=True):
        messages = [{"role": "user", "content": user_message(row)}, {"role": "assistant", "content": row["output"]}]
        expected = assistant_mask(hf_masking_tokenizer, messages)
        text = hf_tokenizer.apply_chat_template(messages, tokenize=False)
        assert example["input_ids"].tolist() == hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert example["input_ids"].tolist() == expected["input_ids"]
        assert (example["labels"] != IGNORE_INDEX).tolist() == [bool(m) for m in expected["assistant_masks"]]
        # what is labelled is the response and the end-of-turn token the model must learn to stop with
        labelled = example["input_ids"][example["labels"] != IGNORE_INDEX].tolist()
        assert tokenizer.decode(labelled) == row["output"] + "<|im_end|>"
        assert labelled[-1] == tokenizer.eos_id
        prompt = hf_tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
        prompt_ids = hf_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert labelled_runs(example["labels"])[0][0] == len(prompt_ids)


def test_alpaca_prompt_style_masks_the_prompt_and_appends_eos(tokenizer, hf_tokenizer):
    rows = first_rows(ALPACA, 20)
    examples = everything(JSON(json_path=ALPACA, prompt_style="alpaca"), tokenizer)[:20]
    for row, example in zip(rows, examples):
        prompt = alpaca_prompt(row["instruction"], row["input"])
        assert prompt.startswith("Below is an instruction that describes a task")
        assert ("### Input:" in prompt) == bool(row["input"])
        prompt_ids = hf_tokenizer(prompt)["input_ids"]
        assert example["input_ids"].tolist() == hf_tokenizer(prompt + row["output"])["input_ids"] + [tokenizer.eos_id]
        response_ids = example["input_ids"][len(prompt_ids):].tolist()
        assert example["labels"].tolist() == [IGNORE_INDEX] * len(prompt_ids) + response_ids


def test_auto_prompt_style_is_alpaca_without_a_chat_template(smollm2_dir, tmp_path):
    no_template = Tokenizer(tokenizer_dir(smollm2_dir, tmp_path / "base", chat_template=None))
    (example, *_) = everything(JSON(json_path=ALPACA), no_template)
    assert no_template.decode(example["input_ids"].tolist()).startswith("Below is an instruction")
    with pytest.raises(UserError, match="no chat template; use --data.prompt_style alpaca"):
        JSON(json_path=ALPACA, prompt_style="chat_template").setup(no_template, 512)


def test_mask_prompt_false_labels_every_token(tokenizer):
    (example, *_) = everything(JSON(json_path=ALPACA, mask_prompt=False), tokenizer)
    assert torch.equal(example["labels"], example["input_ids"])


def test_json_list_and_jsonl_give_the_same_examples(tokenizer, tmp_path):
    rows = first_rows(ALPACA, 10)
    as_list = tmp_path / "rows.json"
    as_list.write_text(json.dumps(rows, indent=2))
    from_list = everything(JSON(json_path=as_list), tokenizer)
    from_lines = everything(JSON(json_path=write_jsonl(tmp_path / "rows.jsonl", rows)), tokenizer)
    assert len(from_list) == 10
    for a, b in zip(from_list, from_lines, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_input_is_optional_and_keys_are_configurable(tokenizer, tmp_path):
    rows = [{"question": "What is 2 + 2?", "answer": "4"},
            {"question": "Name a color.", "context": "", "answer": "Red"},
            {"question": "Translate.", "context": "bonjour", "answer": "hello"}]
    data = JSON(json_path=write_jsonl(tmp_path / "qa.jsonl", rows), prompt_key="question", input_key="context",
                response_key="answer", prompt_style="alpaca")
    examples = everything(data, tokenizer)
    texts = [tokenizer.decode(example["input_ids"].tolist()) for example in examples]
    assert texts[0] == alpaca_prompt("What is 2 + 2?") + "4<|im_end|>"
    assert texts[2] == alpaca_prompt("Translate.", "bonjour") + "hello<|im_end|>"
    assert "### Input:\nbonjour" in texts[2]


def test_korean_rows_round_trip_through_decode(tokenizer, tmp_path):
    rows = first_rows(KOREAN, 100)
    examples = everything(JSON(json_path=write_jsonl(tmp_path / "ko.jsonl", rows)), tokenizer)
    for row, example in zip(rows, examples, strict=True):
        text = tokenizer.decode(example["input_ids"].tolist())
        assert f"<|im_start|>user\n{row['instruction']}<|im_end|>" in text
        labelled = example["input_ids"][example["labels"] != IGNORE_INDEX].tolist()
        assert tokenizer.decode(labelled) == row["output"] + "<|im_end|>"


# ------------------------------------------------------------------------------------ chat rows


def test_chat_labels_all_and_only_assistant_turns(tokenizer, hf_tokenizer, hf_masking_tokenizer, tmp_path):
    rows = first_rows(CHAT, 25)
    examples = everything(Chat(json_path=write_jsonl(tmp_path / "chat.jsonl", rows)), tokenizer)
    for row, example in zip(rows, examples, strict=True):
        messages = row["messages"]
        text = hf_tokenizer.apply_chat_template(messages, tokenize=False)
        assert example["input_ids"].tolist() == hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        expected = assistant_mask(hf_masking_tokenizer, messages)
        assert (example["labels"] != IGNORE_INDEX).tolist() == [bool(m) for m in expected["assistant_masks"]]
        replies = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
        runs = labelled_runs(example["labels"])
        assert [tokenizer.decode(example["input_ids"][start:end].tolist()) for start, end in runs] == replies


def test_chat_template_that_rewrites_earlier_turns_still_labels_each_reply(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    directory = tokenizer_dir(smollm2_dir, tmp_path / "qwen3_like", LAST_TURN_DIFFERS_TEMPLATE)
    rows = first_rows(CHAT, 5)
    examples = everything(Chat(json_path=write_jsonl(tmp_path / "chat.jsonl", rows)), Tokenizer(directory))
    hf = AutoTokenizer.from_pretrained(directory)
    for row, example in zip(rows, examples, strict=True):
        expected = assistant_mask(hf, row["messages"])
        assert example["input_ids"].tolist() == expected["input_ids"]
        assert (example["labels"] != IGNORE_INDEX).tolist() == [bool(m) for m in expected["assistant_masks"]]


def test_chat_needs_a_chat_template(smollm2_dir, tmp_path):
    no_template = Tokenizer(tokenizer_dir(smollm2_dir, tmp_path / "base", chat_template=None))
    with pytest.raises(UserError, match="has no chat template"):
        Chat(json_path=CHAT).setup(no_template, 512)


# ------------------------------------------------------------------------------------ bad rows

GOOD = {"instruction": "Say hi.", "input": "", "output": "Hi!"}


@pytest.mark.parametrize(("lines", "message"), [
    ([GOOD, GOOD, {"instruction": "x", "input": ""}], "rows.jsonl:3: missing key 'output' (keys: instruction, input)"),
    ([GOOD, {"instruction": "x", "output": 3}], "rows.jsonl:2: key 'output' must be a string, got int"),
    ([GOOD, {"instruction": ["x"], "output": "y"}], "rows.jsonl:2: key 'instruction' must be a string, got list"),
    ([GOOD, "not json {"], "rows.jsonl:2: invalid JSON"),
    ([GOOD, ["a", "list"]], "rows.jsonl:2: expected an object, got list"),
])
def test_bad_jsonl_row_names_file_line_and_key(tokenizer, tmp_path, lines, message):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines))
    with pytest.raises(UserError) as error:
        JSON(json_path=path).setup(tokenizer, 512)
    assert str(error.value).startswith(f"{path.parent}/{message}")


def test_bad_row_in_json_list_names_the_line_the_object_starts_on(tokenizer, tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([GOOD, GOOD, {"instruction": "x", "input": ""}], indent=2))
    start_line = path.read_text().split("\n").index("  {", 10) + 1  # the third object
    assert start_line == 12
    with pytest.raises(UserError, match=f"rows.json:{start_line}: missing key 'output' \\(keys: instruction, input\\)"):
        JSON(json_path=path).setup(tokenizer, 512)


def test_invalid_json_list_names_the_line(tokenizer, tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": "b"}\n]\n')
    with pytest.raises(UserError, match="rows.json:3: invalid JSON"):
        JSON(json_path=path).setup(tokenizer, 512)


@pytest.mark.parametrize(("messages", "message"), [
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}],
     "chat.jsonl:2: messages\\[1\\].role must be one of system, user, assistant, tool; got 'bot'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": ["hello"]}],
     "chat.jsonl:2: messages\\[1\\].content must be a string, got list"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant"}],
     "chat.jsonl:2: messages\\[1\\]: missing key 'content' \\(keys: role\\)"),
    ([{"role": "user", "content": "hi"}], "chat.jsonl:2: no assistant message"),
    ("hi", "chat.jsonl:2: 'messages' must be a non-empty list of messages, got str"),
])
def test_bad_chat_row_names_file_line_and_field(tokenizer, tmp_path, messages, message):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [good, {"messages": messages}])
    with pytest.raises(UserError, match=message):
        Chat(json_path=path).setup(tokenizer, 512)


def test_chat_rows_under_another_key(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"conversation": row["messages"]} for row in first_rows(CHAT, 2)])
    with pytest.raises(UserError, match="chat.jsonl:1: missing key 'messages' \\(keys: conversation\\)"):
        Chat(json_path=path).setup(tokenizer, 512)
    assert len(everything(Chat(json_path=path, messages_key="conversation"), tokenizer)) == 2


def test_missing_file_and_missing_path_are_user_errors(tokenizer, tmp_path):
    with pytest.raises(UserError, match="nope.json: no such file"):
        JSON(json_path=tmp_path / "nope.json").setup(tokenizer, 512)
    with pytest.raises(UserError, match="--data JSON needs --data.json_path FILE"):
        JSON().setup(tokenizer, 512)


def test_alpaca_offline_suggests_a_local_file(tokenizer, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # empty, even where the file was downloaded
    with pytest.raises(UserError, match="yahma/alpaca-cleaned.*--data.json_path FILE") as error:
        Alpaca().setup(tokenizer, 512)
    assert "\n" not in str(error.value)
    assert len(everything(Alpaca(json_path=ALPACA), tokenizer)) == 200


# ------------------------------------------------------------------------------------ truncation and split


def test_long_examples_are_truncated_and_counted(tokenizer):
    lengths = [len(example["input_ids"]) for example in everything(JSON(json_path=ALPACA), tokenizer)]
    data = JSON(json_path=ALPACA)
    examples = everything(data, tokenizer, max_seq_length=96)
    assert data.num_examples == 200
    assert data.num_truncated == sum(length > 96 for length in lengths) > 0
    assert len(examples) == 200 - data.num_dropped
    assert all(len(example["input_ids"]) <= 96 for example in examples)
    # a truncated example keeps its start, and at least one target token
    assert all((example["labels"][1:] != IGNORE_INDEX).any() for example in examples)


def test_examples_truncated_before_their_response_are_dropped(tokenizer):
    data = JSON(json_path=ALPACA)
    examples = everything(data, tokenizer, max_seq_length=40)
    assert data.num_dropped > 0 and len(examples) == 200 - data.num_dropped


def test_validation_split_is_deterministic_and_disjoint(tokenizer):
    def split(seed, fraction=0.1):
        train, val = JSON(json_path=ALPACA, val_split_fraction=fraction, seed=seed).setup(tokenizer, 4096)
        return [tuple(train[i]["input_ids"].tolist()) for i in range(len(train))], \
            [tuple(val[i]["input_ids"].tolist()) for i in range(len(val))]

    train, val = split(seed=1)
    assert (len(train), len(val)) == (180, 20)
    assert split(seed=1) == (train, val)
    assert not set(train) & set(val)
    assert set(split(seed=2)[1]) != set(val)
    assert len(split(seed=1, fraction=0.001)[1]) == 1


def test_validation_split_of_tiny_data(tokenizer, tmp_path):
    two = write_jsonl(tmp_path / "two.jsonl", [GOOD, {**GOOD, "output": "Hello!"}])
    train, val = JSON(json_path=two, val_split_fraction=0.5).setup(tokenizer, 512)
    assert (len(train), len(val)) == (1, 1)
    train, val = JSON(json_path=write_jsonl(tmp_path / "one.jsonl", [GOOD])).setup(tokenizer, 512)
    assert (len(train), len(val)) == (1, 0)


# ------------------------------------------------------------------------------------ batches and packing


def test_collate_pads_inputs_with_pad_id_and_labels_with_ignore_index(tokenizer):
    train, _ = JSON(json_path=ALPACA).setup(tokenizer, 512)
    examples = [train[0], train[1], train[2]]
    batch = train.collate(examples)
    assert set(batch) == {"input_ids", "labels"}
    length = max(len(example["input_ids"]) for example in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, length)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        assert torch.equal(batch["input_ids"][row, :n], example["input_ids"])
        assert (batch["input_ids"][row, n:] == tokenizer.pad_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()


@pytest.mark.parametrize("mask_prompt", [True, False])
def test_packing_restarts_positions_per_document_and_keeps_every_target(tokenizer, mask_prompt):
    max_seq_length = 256
    unpacked, _ = JSON(json_path=KOREAN, mask_prompt=mask_prompt).setup(tokenizer, max_seq_length)
    packed, _ = JSON(json_path=KOREAN, mask_prompt=mask_prompt, packing=True).setup(tokenizer, max_seq_length)
    assert len(packed) < len(unpacked) / 2

    documents = iter(unpacked[i] for i in range(len(unpacked)))
    for row in (packed[i] for i in range(len(packed))):
        assert len(row["input_ids"]) <= max_seq_length
        assert set(row) == {"input_ids", "labels", "position_ids", "document_ids"}
        start = 0
        for document_id in range(int(row["document_ids"].max()) + 1):
            document = next(documents)
            end = start + len(document["input_ids"])
            assert (row["document_ids"][start:end] == document_id).all()
            assert row["position_ids"][start:end].tolist() == list(range(end - start))
            assert torch.equal(row["input_ids"][start:end], document["input_ids"])
            # the targets of the shifted loss are the document's own; its first token is never one
            assert torch.equal(row["labels"][start + 1:end], document["labels"][1:])
            assert row["labels"][start] == IGNORE_INDEX
            start = end
        assert start == len(row["input_ids"])
    assert next(documents, None) is None

    def targets(dataset):
        return sum(int((dataset[i]["labels"][1:] != IGNORE_INDEX).sum()) for i in range(len(dataset)))

    assert targets(packed) == targets(unpacked)


def test_collate_pads_packed_rows_into_their_own_document(tokenizer):
    packed, _ = JSON(json_path=KOREAN, packing=True).setup(tokenizer, 200)
    rows = [packed[i] for i in range(len(packed))]
    short = min(rows, key=lambda row: len(row["input_ids"]))
    batch = packed.collate([rows[0], short])
    assert {key: tuple(value.shape) for key, value in batch.items()} == {
        key: (2, len(rows[0]["input_ids"])) for key in ("input_ids", "labels", "position_ids", "document_ids")}
    n = len(short["input_ids"])
    assert n < batch["input_ids"].shape[1]
    assert (batch["document_ids"][1, n:] == -1).all() and (batch["labels"][1, n:] == IGNORE_INDEX).all()
    assert (batch["position_ids"][1, n:] == 0).all()
