"""GRPO as TRL's GRPOTrainer defines it: the clipped per-token loss and its four normalizations, the k3 KL, group
advantages, rewards (built-in, the user's own, reward models) with one-line errors, seeded rollouts that a resumed
run and a two-process run reproduce, and a toy task whose reward rises."""
import json
import math
import re
import shutil
from pathlib import Path

import lightning_fabric as L
import pytest
import torch
from safetensors.torch import load_file

from litllm.checkpoint import copy_tokenizer_files, load_model, write_model_files
from litllm.data import Prompts
from litllm.decode import generate_tokens, sample_continuations
from litllm.errors import UserError
from litllm.finetune import grpo
from litllm.finetune.grpo import GRPOArgs, aggregate, group_advantages, grpo_token_loss, loss_units, micro_batch
from litllm.lora import LoRAConfig, adapter_weights, apply_lora, lora_state_dict, save_adapter
from litllm.model import RewardGPT
from litllm.reward import RewardModel
from litllm.rewards import accuracy, answer_line, load_rewards, number_only
from litllm.tokenizer import Tokenizer
from litllm.training.args import TrainArgs
from litllm.training.rollouts import rollout_metrics
from runs import litllm, logged

DATA = Path(__file__).resolve().parents[1] / "data"
ARITHMETIC = DATA / "arithmetic_demo.jsonl"
# metrics that measure time, not what the run computed
TIMING = ("timing/generate", "timing/score", "timing/train", "rollout_tokens_per_sec", "tokens_per_sec",
          "peak_memory_gb")


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def all_logged(out_dir):
    """{metric: {step: value}} of every metric a run logged but the timings."""
    header = next((out_dir / "logs").glob("version_*/metrics.csv")).read_text().splitlines()[0].split(",")
    return {key: logged(out_dir, key) for key in header if key != "step" and key not in TIMING}


# ------------------------------------------------------------------------------------------ the loss


def test_token_loss_clipping_and_k3_kl_equal_the_formulas():
    torch.manual_seed(0)
    n = 64
    logps, old, ref = -3 * torch.rand(3, n, dtype=torch.float64)
    advantages = torch.randn(n, dtype=torch.float64)
    args = GRPOArgs(beta=0.04, epsilon=0.2, epsilon_high=0.28)
    losses, metrics = grpo_token_loss(logps, old, ref, advantages, args)
    low = high = 0
    for i in range(n):
        ratio = math.exp(logps[i] - old[i])
        a = advantages[i].item()
        clipped = min(max(ratio, 0.8), 1.28)
        kl = math.exp(ref[i] - logps[i]) - (ref[i] - logps[i]).item() - 1  # Schulman's k3
        assert losses[i].item() == pytest.approx(-min(ratio * a, clipped * a) + 0.04 * kl, rel=1e-12)
        low += ratio < 0.8 and a < 0
        high += ratio > 1.28 and a > 0
    assert low and high  # both regions occur in this draw
    assert metrics["clip_ratio/low_mean"] == low and metrics["clip_ratio/high_mean"] == high
    assert metrics["clip_ratio/region_mean"] == low + high
    expected_kl = (torch.exp(ref - logps) - (ref - logps) - 1).sum()
    assert metrics["kl"].item() == pytest.approx(expected_kl.item())

    # mu = 1: pi_old is the policy itself, so the ratio is 1, nothing is clipped, and the gradient is -A per token
    current = logps.clone().requires_grad_(True)
    losses, metrics = grpo_token_loss(current, current.detach(), None, advantages, GRPOArgs())
    assert metrics["clip_ratio/region_mean"] == 0 and "kl" not in metrics
    losses.sum().backward()
    assert torch.allclose(current.grad, -advantages)


def test_each_loss_type_normalizes_as_trl_defines_it():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    rows = torch.tensor([0, 0, 0, 1, 2, 2])  # completions of 3, 1 and 2 tokens; a 4th completion fully masked
    assert aggregate(losses, rows, 4, "grpo", 8).item() == pytest.approx(2 + 4 + 5.5 + 0)  # each row's mean
    assert aggregate(losses, rows, 4, "bnpo", 8).item() == pytest.approx(21 / 6)  # the micro-batch's tokens
    assert aggregate(losses, rows, 4, "dr_grpo", 8).item() == pytest.approx(21 / 8)  # / max_completion_length
    assert aggregate(losses, rows, 4, "dapo", 8).item() == pytest.approx(21)  # / every token of the step, later

    samples = [{"prompt_ids": [5, 6], "completion_ids": [7, 2], "truncated": False, "advantage": 1.0},
               {"prompt_ids": [5, 6, 9], "completion_ids": [8, 8, 8], "truncated": True, "advantage": -1.0}]
    batch = micro_batch(samples, pad_id=0, mask_truncated=False)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2, 0, 0], [5, 6, 9, 8, 8, 8]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 2, -100, -100], [-100, -100, -100, 8, 8, 8]]
    assert [loss_units(batch, t) for t in ("grpo", "bnpo", "dr_grpo", "dapo")] == [2, 1, 2, 5]
    masked = micro_batch(samples, pad_id=0, mask_truncated=True)  # DAPO's overlong filtering
    assert masked["labels"][1].eq(-100).all() and loss_units(masked, "dapo") == 2 and loss_units(masked, "grpo") == 2


def test_a_micro_batch_of_only_masked_completions_trains_nothing_and_breaks_nothing(tiny_chat_model_dir):
    model = apply_lora(load_model(tiny_chat_model_dir), LoRAConfig(r=4, dropout=0.0))
    samples = [{"prompt_ids": [5, 6], "completion_ids": [7, 8], "truncated": True, "advantage": 1.0,
                "old_logps": torch.zeros(2), "ref_logps": torch.zeros(2)}] * 2
    batch = micro_batch(samples, pad_id=0, mask_truncated=True)
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        loss, metrics = grpo.grpo_objective(model, batch, GRPOArgs(loss_type=loss_type, beta=0.1), 16)
        loss.backward()  # on the graph, with zero gradients (DDP still syncs them)
        assert loss.item() == 0 and metrics["count/tokens"] == 0
        assert all(p.grad is not None and not p.grad.any() for p in model.parameters() if p.requires_grad)


def test_group_advantages_and_an_all_equal_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])  # the second group teaches nothing
    advantages, std = group_advantages(rewards, 4)
    first = torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert torch.allclose(advantages[:4], (first - 0.5) / (first.std() + 1e-4))
    assert advantages[4:].eq(0).all() and std[4:].eq(0).all()

    advantages, _ = group_advantages(rewards, 4, scale_rewards="none")
    assert torch.allclose(advantages[:4], first - 0.5)
    advantages, _ = group_advantages(rewards, 4, advantage="rloo", scale_rewards="none")
    # RLOO: each reward against the mean of its group's other three
    assert torch.allclose(advantages[:4], torch.tensor([1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3]))
    advantages, std = group_advantages(rewards, 4, scale_rewards="batch", batch_std=0.25)
    assert torch.allclose(advantages[:4], (first - 0.5) / (0.25 + 1e-4)) and std.eq(0.25).all()

    # the log says how many groups taught nothing, and each reward's mean and std over what it scored
    _, std = group_advantages(rewards, 4)
    per_reward = torch.stack([rewards, torch.tensor([1.0, float("nan")] * 4)], dim=1)
    samples = [{"completion_ids": [1] * (i + 1), "truncated": i == 7} for i in range(8)]
    metrics = rollout_metrics(L.Fabric(accelerator="cpu", devices=1), load_rewards(["number_only", "accuracy"]),
                              samples, per_reward, rewards, std)
    assert metrics["frac_reward_zero_std"] == 0.5 and metrics["reward"] == pytest.approx(0.5)
    assert metrics["reward_std"] == pytest.approx(first.std().item() / 2)
    assert metrics["rewards/number_only/std"] == pytest.approx(rewards.std().item())
    assert metrics["rewards/accuracy/mean"] == 1.0 and metrics["rewards/accuracy/std"] == 0.0  # NaN: not scored
    assert metrics["completions/mean_length"] == 4.5 and metrics["completions/clipped_ratio"] == 1 / 8


def test_bad_grpo_options_are_user_errors():
    for kwargs, message in (({"num_generations": 1}, "--grpo.num_generations must be at least 2"),
                            ({"loss_type": "ppo"}, "--grpo.loss_type must be one of grpo, bnpo, dr_grpo, dapo"),
                            ({"temperature": 0.0}, "--grpo.temperature must be above 0"),
                            ({"scale_rewards": "yes"}, "--grpo.scale_rewards must be one of group, batch, none")):
        with pytest.raises(UserError, match=message):
            GRPOArgs(**kwargs)
    with pytest.raises(UserError, match="multiple of --grpo.num_generations 8 x 2 device"):
        grpo.check_batches(TrainArgs(global_batch_size=8, micro_batch_size=4), GRPOArgs(), world_size=2)
    with pytest.raises(UserError, match=r"--train.save_interval \(3\) must be a multiple of --grpo.num_iterations"):
        grpo.check_batches(TrainArgs(global_batch_size=8, save_interval=3), GRPOArgs(num_iterations=2), 1)


# ------------------------------------------------------------------------------------------ rewards


def test_built_in_rewards_read_numbers_as_gsm8k_writes_them():
    completions = ["11", "21 - 10 = 11", "The answer is 1,000.", "#### 72\n", "no number", " 11. "]
    answers = ["11", "11", "1000", "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "3", "11"]
    assert accuracy(completions, answers) == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    assert accuracy(["5"], [None]) == [None]  # no answer: not scorable
    assert number_only(completions) == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert answer_line(["so 2+2=4\n#### 4", "#### four", "4"]) == [1.0, 0.0, 0.0]
    chat = [[{"role": "assistant", "content": "11"}]]  # a chat prompt's completion is a message
    assert accuracy(chat, ["11"]) == [1.0] and number_only(chat) == [1.0]


def test_reward_specs_load_and_bad_ones_fail_in_one_line(tmp_path):
    functions = tmp_path / "my_rewards.py"
    functions.write_text("def short(completions, **kwargs):\n"
                         "    return [1.0 / len(c) for c in completions]\n\n"
                         "def few(completions, **kwargs):\n    return [1.0]\n\n"
                         "def texts(completions, **kwargs):\n    return ['high' for c in completions]\n")
    short, few, texts = load_rewards([f"{functions}:short", f"{functions}:few", f"{functions}:texts"])
    assert short.name == "short" and short(["p", "p"], ["ab", "abcd"], [[1], [2]], {}) == [0.5, 0.25]
    with pytest.raises(UserError, match=r"my_rewards.py:short raised ZeroDivisionError: float division by zero "
                                        r"\(at .*my_rewards.py:2 in short\)"):
        short(["p"], [""], [[]], {})  # the user's file and line, not litllm's frames
    with pytest.raises(UserError, match="returned 1 values for 2 completions"):
        few(["p", "p"], ["a", "b"], [[1], [2]], {})
    with pytest.raises(UserError, match="returned 'high' \\(str\\); rewards are floats"):
        texts(["p"], ["a"], [[1]], {})
    for spec, message in ((f"{functions}:missing", "has no function missing (functions: few, short, texts)"),
                          (f"{tmp_path}/nothing.py:f", "nothing.py is not a file"),
                          ("no_such_module_xyz:f", "cannot import no_such_module_xyz"),
                          ("exactness", "not a built-in reward (accuracy, number_only, answer_line)")):
        with pytest.raises(UserError, match=re.escape(message)):
            load_rewards([spec])
    twice = load_rewards(["accuracy", "accuracy"])
    assert [r.name for r in twice] == ["accuracy", "accuracy_2"]


def test_a_reward_model_dir_scores_the_prompt_and_completion_as_a_chat(tiny_chat_model_dir, tmp_path):
    torch.manual_seed(0)
    model = RewardGPT(load_model(tiny_chat_model_dir).config)
    (tmp_path / "rm").mkdir()
    write_model_files(model, tmp_path / "rm")
    copy_tokenizer_files(tiny_chat_model_dir, tmp_path / "rm")
    [reward] = load_rewards([str(tmp_path / "rm")])
    assert reward.name == "rm"
    scores = reward(["What is 2 + 2?", [{"role": "user", "content": "Hi"}]],
                    ["4", [{"role": "assistant", "content": "Hello"}]], [[1], [2]], {})
    expected = RewardModel.load(tmp_path / "rm").score([
        [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]])
    assert scores == pytest.approx(expected, abs=1e-6) and scores[0] != scores[1]


# ------------------------------------------------------------------------------------------ data and rollouts


@pytest.mark.parametrize("row, message", [
    ({"question": "q"}, "missing key 'prompt' (keys: question); pick another with --data.prompt_key"),
    ({"prompt": 7}, "'prompt' must be a string or a list of messages, got int"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "ends with an assistant message"),
    ({"prompt": " "}, "'prompt' is empty"),
])
def test_bad_prompt_rows_name_file_line_and_key(tiny_chat_model_dir, tmp_path, row, message):
    path = write_rows(tmp_path / "prompts.jsonl", [{"prompt": "fine"}, row])
    with pytest.raises(UserError) as error:
        Prompts(json_path=path).setup(Tokenizer(tiny_chat_model_dir), 128)
    assert str(error.value).startswith(f"{path}:2: ") and message in str(error.value)


def test_prompts_keep_their_columns_and_leave_out_ones_too_long(tiny_chat_model_dir, tmp_path):
    tokenizer = Tokenizer(tiny_chat_model_dir)
    rows = [{"prompt": "What is 2 + 2?", "answer": "4"}, {"prompt": "word " * 100, "answer": "0"},
            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "id": 3}]
    data = Prompts(json_path=write_rows(tmp_path / "prompts.jsonl", rows))
    train, _ = data.setup(tokenizer, 64)
    assert len(train) == 2 and "1 of 3 left out: longer than 64 tokens" in data.summary()
    assert train[0]["prompt_ids"] == tokenizer.encode_chat([{"role": "user", "content": "What is 2 + 2?"}])
    assert train[0]["columns"] == {"answer": "4"} and train[1]["columns"] == {"id": 3}
    assert train[1]["prompt_ids"] == tokenizer.encode_chat(rows[2]["prompt"])


def test_group_sampling_prefills_once_and_is_reproducible(tiny_chat_model_dir):
    model = load_model(tiny_chat_model_dir).eval()
    tokenizer = Tokenizer(tiny_chat_model_dir)
    prompt = tokenizer.encode_chat([{"role": "user", "content": "Say something."}])
    greedy = list(generate_tokens(model, prompt, 6))
    assert sample_continuations(model, prompt, 3, 6, temperature=1e-6) == [greedy] * 3  # every row decodes alike

    def draw(seed):
        return sample_continuations(model, prompt, 4, 6, temperature=1.0, generator=torch.Generator().manual_seed(seed))

    first = draw(1)
    assert first == draw(1) and first != draw(2) and len({tuple(row) for row in first}) == 4
    stopped = sample_continuations(model, prompt, 4, 6, temperature=1.0, stop_ids=[first[0][1]],
                                   generator=torch.Generator().manual_seed(1))
    assert stopped[0] == first[0][:2]  # a row ends at its stop token, kept; the others go on as they would


def nonzero_adapter(model_dir, scale=0.2):
    torch.manual_seed(0)
    model = apply_lora(load_model(model_dir), LoRAConfig(r=4, dropout=0.0))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, scale)  # an adapter that changes the model a lot
    return model


def test_adapter_weights_swap_in_a_copy_and_back(tiny_chat_model_dir):
    model = nonzero_adapter(tiny_chat_model_dir)
    start = {name: t.detach().clone() for name, t in lora_state_dict(model).items()}
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        at_start = model(x)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data.add_(0.1)
        trained = model(x)
        assert not torch.allclose(trained, at_start)
        with adapter_weights(model, start):
            assert torch.equal(model(x), at_start)
        assert torch.equal(model(x), trained)


# ------------------------------------------------------------------------------------------ runs


def toy_task(model_dir, tmp_path):
    """Prompts that all ask the same thing, and a reward of 1 when the completion's first token is the one the random
    model ranks second for it: a preference only training can create."""
    tokenizer = Tokenizer(model_dir)
    prompt = tokenizer.encode_chat([{"role": "user", "content": "Say something."}])
    with torch.no_grad():
        target = int(load_model(model_dir)(torch.tensor([prompt]))[0, -1].topk(2).indices[1])
    rewards = tmp_path / "toy_rewards.py"
    rewards.write_text(f"def first_token(completion_ids, **kwargs):\n"
                       f"    return [float(ids[0] == {target}) for ids in completion_ids]\n")
    return write_rows(tmp_path / "prompts.jsonl", [{"prompt": "Say something."}] * 8), f"{rewards}:first_token"


def test_toy_reward_rises(tiny_chat_model_dir, tmp_path):
    prompts, reward = toy_task(tiny_chat_model_dir, tmp_path)
    train = TrainArgs(global_batch_size=16, micro_batch_size=16, max_steps=20, lr=3e-3, min_lr=3e-3, warmup_steps=0,
                      max_seq_length=64, save_interval=None)
    grpo.setup(tiny_chat_model_dir, out_dir=tmp_path / "out", data=Prompts(json_path=prompts), reward=reward,
               train=train, grpo=GRPOArgs(num_generations=8, max_completion_length=1, top_k=4), full=True)
    rewards = logged(tmp_path / "out", "reward")
    early, late = sum(rewards[s] for s in (1, 2, 3)) / 3, sum(rewards[s] for s in range(16, 21)) / 5
    assert early < 0.5 and late > 0.75, rewards  # seeds 1-5 measured: early 0.31-0.48, late 0.85-0.93
    lines = (tmp_path / "out" / "logs" / "version_0" / "completions.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert first["step"] == 1 and first["prompt"] == "Say something." and set(first["rewards"]) == {"first_token"}


def run_grpo(model_dir, out_dir, prompts, reward, resume=False, **kwargs):
    """4 steps, two on each batch of rollouts (mu = 2), with a held-out prompt validated at steps 2 and 4."""
    train = TrainArgs(global_batch_size=8, micro_batch_size=4, max_steps=4, lr=1e-3, warmup_steps=1,
                      max_seq_length=64, save_interval=2, eval_interval=2)
    args = GRPOArgs(num_generations=4, max_completion_length=3, top_k=4, beta=0.1, num_iterations=2, loss_type="grpo")
    return grpo.setup(model_dir, out_dir=out_dir, data=Prompts(json_path=prompts, val_split_fraction=0.1),
                      reward=reward, train=train, grpo=args, resume="auto" if resume else False, **kwargs)


def test_an_adapter_start_is_the_reference_and_a_resumed_run_samples_and_logs_the_same(tiny_chat_model_dir,
                                                                                      tmp_path):
    prompts, _ = toy_task(tiny_chat_model_dir, tmp_path)
    (tmp_path / "variety.py").write_text("def variety(completion_ids, **kwargs):\n"
                                         "    return [float(len(set(ids))) for ids in completion_ids]\n")
    reward = f"{tmp_path / 'variety.py'}:variety"
    save_adapter(nonzero_adapter(tiny_chat_model_dir), LoRAConfig(r=4, dropout=0.0), tmp_path / "sft",
                 base_checkpoint=tiny_chat_model_dir)
    run_grpo(tiny_chat_model_dir, tmp_path / "run", prompts, reward, adapter=tmp_path / "sft")
    metrics = all_logged(tmp_path / "run")
    # the policy starts as the reference (the SFT adapter); the first step on each batch of rollouts trains the
    # policy that sampled them (ratio 1, nothing clipped)
    assert metrics["kl"][1] == 0 and metrics["kl"][2] > 0 and metrics["kl"][3] > 0
    assert metrics["clip_ratio/region_mean"][1] == 0 and metrics["clip_ratio/region_mean"][3] == 0
    for name in ("reward", "reward_std", "frac_reward_zero_std", "rewards/variety/mean", "rewards/variety/std",
                 "completions/mean_length", "completions/clipped_ratio", "entropy", "loss"):
        assert metrics[name].keys() == {1, 2, 3, 4}, name
    assert metrics["val_reward"].keys() == metrics["val_rewards/variety/mean"].keys() == {2, 4}
    logged_steps = [json.loads(line)["step"] for line in
                    (tmp_path / "run" / "logs" / "version_0" / "completions.jsonl").read_text().splitlines()]
    assert sorted(set(logged_steps)) == [1, 3]  # each batch of rollouts that has a logged step

    resumed = tmp_path / "resumed"  # all a kill -9 after step 2 leaves: its atomic checkpoint
    shutil.copytree(tmp_path / "run" / "step-000002", resumed / "step-000002")
    run_grpo(tiny_chat_model_dir, resumed, prompts, reward, resume=True, adapter=tmp_path / "sft")
    again = all_logged(resumed)
    for name, values in metrics.items():
        assert again[name] == {step: v for step, v in values.items() if step > 2}, name
    final, resumed_final = (load_file(d / "final" / "adapter_model.safetensors") for d in (tmp_path / "run", resumed))
    assert all(torch.equal(final[name], resumed_final[name]) for name in final)


def test_two_processes_sample_and_train_as_one_with_ddp_and_fsdp(tiny_chat_model_dir, tmp_path):
    prompts, reward = toy_task(tiny_chat_model_dir, tmp_path)
    args = ["finetune", "grpo", tiny_chat_model_dir, "--data", "Prompts", "--data.json_path", prompts,
            "--reward", reward, "--reward", "number_only", "--reward_weights", "[1.0, 0.5]",
            "--train.global_batch_size", "8", "--train.micro_batch_size", "4", "--train.max_steps", "2",
            "--train.max_seq_length", "64", "--grpo.num_generations", "4", "--grpo.max_completion_length", "3",
            "--grpo.top_k", "4", "--grpo.beta", "0.1", "--grpo.scale_rewards", "batch", "--lora.dropout", "0"]
    one = litllm(*args, "--out_dir", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    assert "Rewards: first_token (x1), number_only (x0.5)" in one.stdout
    expected = all_logged(tmp_path / "one")
    assert len(expected["loss"]) == 2
    assert expected["kl"][1] == 0  # fresh adapters: the reference is the base model, which the policy starts as
    for strategy in ("ddp", "fsdp"):  # FSDP: each device samples with the full weights gathered once per rollout
        two = litllm(*args, "--out_dir", tmp_path / strategy, "--devices", "2", "--strategy", strategy)
        assert two.returncode == 0, two.stderr
        got = all_logged(tmp_path / strategy)
        assert got.keys() == expected.keys()
        for name in expected:
            assert got[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-7), (strategy, name)


def test_a_failing_reward_function_ends_in_one_line_naming_its_line(tiny_chat_model_dir, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def reward(completions, answer, **kwargs):\n"
                      "    return [int(a) / 0 for a in answer]\n")
    result = litllm("finetune", "grpo", tiny_chat_model_dir, "--data", "Prompts", "--data.json_path", ARITHMETIC,
                    "--reward", f"{broken}:reward", "--out_dir", tmp_path / "out", "--train.max_steps", "1",
                    "--grpo.num_generations", "2", "--train.global_batch_size", "2", "--train.micro_batch_size", "2",
                    "--grpo.max_completion_length", "2")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: reward function {broken}:reward raised ZeroDivisionError: division by zero "
                           f"(at {broken}:2 in "), result.stderr
    assert "Traceback" not in result.stderr
    out = tmp_path / "out"
    assert not out.exists() or not [p for p in out.iterdir() if p.name != "logs"]  # no checkpoint, whole or half
