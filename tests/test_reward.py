"""Reward models: the Bradley-Terry loss, outputs that transformers (and PEFT) load and score as litllm does, the
RewardModel API, learning an obvious preference, exact resume, one-line errors."""
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from litllm import RewardModel
from litllm.checkpoint import load_model, save_checkpoint
from litllm.data import Preference
from litllm.errors import UserError
from litllm.finetune import reward
from litllm.finetune.reward import bradley_terry_loss
from litllm.lora import LoRAConfig, apply_lora, load_adapter, save_adapter
from litllm.tokenizer import Tokenizer
from litllm.training.args import TrainArgs
from runs import logged

DEMO = Path(__file__).resolve().parents[1] / "data" / "hh_rlhf_demo.jsonl"
METRICS = ("loss", "accuracy", "margin", "mean_reward", "min_reward", "max_reward")


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_bradley_terry_loss_equals_the_closed_form_with_margin_and_centering():
    torch.manual_seed(0)
    chosen, rejected, margin = torch.randn(3, 16, dtype=torch.float64)
    coefficient = 0.01
    losses = bradley_terry_loss(chosen, rejected, margin, coefficient)
    plain = bradley_terry_loss(chosen, rejected)
    for i in range(16):
        c, r, m = chosen[i].item(), rejected[i].item(), margin[i].item()
        # P(chosen preferred) = sigmoid(r_c - r_r - margin); centering adds coefficient * (r_c + r_r)^2
        expected = -math.log(1 / (1 + math.exp(-(c - r - m)))) + coefficient * (c + r) ** 2
        assert losses[i].item() == pytest.approx(expected, rel=1e-12)
        assert plain[i].item() == pytest.approx(-math.log(1 / (1 + math.exp(-(c - r)))), rel=1e-12)


def run_reward(model_dir, out_dir, resume=False, **kwargs):
    """4 steps of 4 pairs on 20 real pairs (4 held out), validating and saving every 2 steps."""
    data_path = out_dir.parent / "pairs.jsonl"
    if not data_path.exists():
        rows = [json.loads(line) for line in DEMO.read_text().splitlines()[:20]]
        write_rows(data_path, [{**row, "margin": i % 3 * 0.5} for i, row in enumerate(rows)])
    train = TrainArgs(global_batch_size=4, micro_batch_size=2, max_steps=4, max_seq_length=96, lr=1e-3,
                      warmup_steps=1, eval_interval=2, save_interval=2)
    return reward.setup(model_dir, out_dir=out_dir, data=Preference(json_path=data_path, val_split_fraction=0.2),
                        train=train, resume="auto" if resume else False, **kwargs)


def assert_resumes_with_the_same_metrics(model_dir, out_dir, tmp_path, **kwargs):
    """A copy of the run cut back to its step-2 checkpoint, resumed, logs exactly what the whole run logged after."""
    resumed = tmp_path / "resumed"
    shutil.copytree(out_dir, resumed, ignore=shutil.ignore_patterns("final", "logs"))
    run_reward(model_dir, resumed, resume=True, **kwargs)
    for key in (*METRICS, "val_loss", "val_accuracy", "val_min_reward"):
        expected = {step: value for step, value in logged(out_dir, key).items() if step > 2}
        assert expected and logged(resumed, key) == expected, key


def transformers_scores(model, tokenizer: Tokenizer, items) -> torch.Tensor:
    """transformers' rewards of `items`, right-padded together in one batch with an attention mask."""
    ids = [tokenizer.encode(item) if isinstance(item, str) else tokenizer.encode_chat(item, False) for item in items]
    width = max(map(len, ids))
    pad_id = model.config.pad_token_id
    input_ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in ids])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask).logits.squeeze(-1)


ITEMS = ["How do I bake bread?", "\n\nHuman: Tell me a joke.\n\nAssistant: Why did the chicken cross the road? To get "
         "to the other side.", [{"role": "user", "content": "Is the sea salty?"},
                                {"role": "assistant", "content": "Yes, it holds about 3.5% salt."}]]


def test_lora_reward_model_is_a_peft_adapter_that_scores_as_transformers_and_resumes_exactly(tiny_chat_model_dir,
                                                                                              tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    final = run_reward(tiny_chat_model_dir, tmp_path / "run", lora=LoRAConfig(r=4, dropout=0.0))
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    ours = RewardModel.load(tiny_chat_model_dir, adapter=final)
    # this base's config.json names no pad token: training padded (and read rewards by) the tokenizer's
    assert json.loads((tiny_chat_model_dir / "config.json").read_text()).get("pad_token_id") is None
    base = AutoModelForSequenceClassification.from_pretrained(tiny_chat_model_dir, num_labels=1, dtype=torch.float32,
                                                              pad_token_id=ours.tokenizer.pad_id)
    theirs = PeftModel.from_pretrained(base, final).eval()
    scores = ours.score(ITEMS)
    torch.testing.assert_close(torch.tensor(scores), transformers_scores(theirs, ours.tokenizer, ITEMS), atol=1e-4,
                               rtol=0)
    assert ours.score(ITEMS[2]) == pytest.approx(scores[2], abs=1e-5)  # one item: one float, batched or not
    assert len(set(scores)) == 3  # the weights moved off their start: different texts, different rewards

    # a conversation scores as training rendered it: the reward of a pair's chosen sequence
    pairs, _ = Preference(json_path=tmp_path / "pairs.jsonl", val_split_fraction=0.0).setup(ours.tokenizer, 512)
    with torch.no_grad():
        trained_reward = ours.model(pairs.collate([pairs[0]])["input_ids"][:1]).item()
    row = json.loads((tmp_path / "pairs.jsonl").read_text().splitlines()[0])
    prompt, chosen, _ = Preference().conversation(row)
    assert ours.score([*prompt, {"role": "assistant", "content": chosen}]) == pytest.approx(trained_reward, abs=1e-5)

    run = tmp_path / "run"
    for step in (2, 4):
        assert logged(run, "min_reward")[step] <= logged(run, "mean_reward")[step] <= logged(run, "max_reward")[step]
        assert logged(run, "val_min_reward")[step] <= logged(run, "val_max_reward")[step]
    assert_resumes_with_the_same_metrics(tiny_chat_model_dir, run, tmp_path, lora=LoRAConfig(r=4, dropout=0.0))


def test_full_reward_model_is_a_sequence_classification_dir_transformers_scores_the_same(tiny_chat_model_dir,
                                                                                         tmp_path):
    from transformers import AutoModelForSequenceClassification

    final = run_reward(tiny_chat_model_dir, tmp_path / "run", full=True)
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    with safe_open(final / "model.safetensors", "pt") as f:
        assert "score.weight" in f.keys() and "lm_head.weight" not in f.keys()
    theirs = AutoModelForSequenceClassification.from_pretrained(final, dtype=torch.float32).eval()
    assert theirs.num_labels == 1
    ours = RewardModel.load(final)
    torch.testing.assert_close(torch.tensor(ours.score(ITEMS)), transformers_scores(theirs, ours.tokenizer, ITEMS),
                               atol=1e-4, rtol=0)
    assert_resumes_with_the_same_metrics(tiny_chat_model_dir, tmp_path / "run", tmp_path, full=True)


def marker_pairs(n, seed):
    """Pairs whose chosen answer opens with a friendly phrase and whose rejected one with a rude phrase of as many
    tokens, the rest random words: only the opening tells them apart."""
    rng = random.Random(seed)
    words = "the a small big quiet bright old new warm cold fast slow green blue red happy calm wild soft".split()
    topics = ["cats", "rain", "bread", "trains", "music", "rivers", "chess", "tea", "snow", "books", "birds", "maps"]
    rows = []
    for _ in range(n):
        topic = rng.choice(topics)
        rows.append({"prompt": f"Tell me about {topic}.",
                     "chosen": f"Happy to help! {' '.join(rng.choices(words, k=6))} {topic}.",
                     "rejected": f"Go away now! {' '.join(rng.choices(words, k=6))} {topic}."})
    return rows


def test_reward_model_learns_an_obvious_preference(tiny_chat_model_dir, tmp_path):
    train = TrainArgs(global_batch_size=8, micro_batch_size=8, max_steps=12, max_seq_length=64, lr=3e-3,
                      warmup_steps=0, eval_interval=4, log_interval=4)
    data = Preference(json_path=write_rows(tmp_path / "pairs.jsonl", marker_pairs(48, seed=0)),
                      val_split_fraction=0.25)
    final = reward.setup(tiny_chat_model_dir, out_dir=tmp_path / "run", data=data, train=train)
    assert logged(tmp_path / "run", "val_loss")[12] < 0.3  # from about log 2 = 0.69 with the fresh head

    model = RewardModel.load(tiny_chat_model_dir, adapter=final)
    held_out = marker_pairs(32, seed=1)
    conversations = [[{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row[side]}]
                     for side in ("chosen", "rejected") for row in held_out]
    scores = model.score(conversations)
    accuracy = sum(c > r for c, r in zip(scores[:32], scores[32:])) / 32
    assert accuracy > 0.9


def test_reward_model_mistakes_are_one_line_errors(tiny_chat_model_dir, tmp_path):
    with pytest.raises(UserError, match="not a reward model"):
        RewardModel.load(tiny_chat_model_dir)
    reward_dir = save_checkpoint(load_model(tiny_chat_model_dir, reward=True), tmp_path / "rm",
                                 tokenizer_dir=tiny_chat_model_dir)
    with pytest.raises(UserError, match="RewardModel.load"):
        load_model(reward_dir)  # a reward model has no lm_head to generate with

    lm_adapter = tmp_path / "lm_adapter"
    save_adapter(apply_lora(load_model(tiny_chat_model_dir), LoRAConfig(r=2)), LoRAConfig(r=2), lm_adapter,
                 base_checkpoint=tiny_chat_model_dir)
    with pytest.raises(UserError, match="not a reward model's adapter"):
        RewardModel.load(tiny_chat_model_dir, adapter=lm_adapter)
    rm_adapter = tmp_path / "rm_adapter"
    save_adapter(apply_lora(load_model(tiny_chat_model_dir, reward=True), LoRAConfig(r=2)), LoRAConfig(r=2),
                 rm_adapter, base_checkpoint=tiny_chat_model_dir)
    with pytest.raises(UserError, match="RewardModel.load"):
        load_adapter(load_model(tiny_chat_model_dir), rm_adapter)

    rows = [json.loads(line) for line in DEMO.read_text().splitlines()[:3]]
    rows[1]["margin"] = "big"
    path = write_rows(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(UserError, match=r"pairs\.jsonl:2: 'margin' must be a number"):
        Preference(json_path=path).setup(Tokenizer(tiny_chat_model_dir), 128)
