"""DPO as specified: the papers' losses, response-only log-probs, the adapter-free reference, learning on real
preference pairs, one-line errors for bad rows, outputs other tools load, exact resume."""
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from litllm.checkpoint import load_model
from litllm.data import Preference
from litllm.errors import UserError
from litllm.finetune import dpo
from litllm.finetune.dpo import DPOArgs, dpo_loss, dpo_objective, orpo_loss, simpo_loss
from litllm.lora import LoRAConfig, apply_lora, disable_adapters, save_adapter
from litllm.tokenizer import Tokenizer
from litllm.training.args import TrainArgs
from litllm.training.losses import (
    LinearLogprobs, count_row_targets, sequence_logprobs, token_logprobs_and_entropy,
)
from runs import litllm, logged

DEMO = Path(__file__).resolve().parents[1] / "data" / "hh_rlhf_demo.jsonl"
MARKER = "\n\nAssistant:"


def hh_rows(n=None):
    return [json.loads(line) for line in DEMO.read_text().splitlines()[:n]]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def demo_pairs(tiny_chat_model_dir):
    train, _ = Preference(json_path=DEMO, val_split_fraction=0.0).setup(Tokenizer(tiny_chat_model_dir), 256)
    return train


# ------------------------------------------------------------------------------------------ the loss


@pytest.mark.parametrize("loss, label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)])
def test_loss_for_fixed_logps_equals_the_papers_formula(loss, label_smoothing):
    torch.manual_seed(0)
    policy_chosen, policy_rejected, reference_chosen, reference_rejected = -50 * torch.rand(4, 16, dtype=torch.float64)
    beta = 0.3
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, reference_chosen,
                                                        reference_rejected, beta, loss, label_smoothing)
    for i in range(16):
        # h: how much more the policy prefers the chosen response than the reference does (DPO eq. 7, IPO eq. 17)
        h = (policy_chosen[i].item() - reference_chosen[i].item()) - (policy_rejected[i].item()
                                                                        - reference_rejected[i].item())
        if loss == "sigmoid":  # DPO; with label smoothing eps, cDPO: the label is wrong with probability eps
            expected = -(1 - label_smoothing) * math.log(1 / (1 + math.exp(-beta * h))) \
                       - label_smoothing * math.log(1 / (1 + math.exp(beta * h)))
        elif loss == "ipo":  # IPO with tau = beta
            expected = (h - 1 / (2 * beta)) ** 2
        else:  # SLiC's calibration hinge with margin 1 on beta * h
            expected = max(0.0, 1 - beta * h)
        assert losses[i].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert chosen_rewards[i].item() == pytest.approx(beta * (policy_chosen[i] - reference_chosen[i]).item())
        assert rejected_rewards[i].item() == pytest.approx(beta * (policy_rejected[i] - reference_rejected[i]).item())


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_simpo_loss_for_fixed_logps_equals_the_papers_formula(label_smoothing):
    torch.manual_seed(0)
    chosen, rejected = -3 * torch.rand(2, 16, dtype=torch.float64)  # average log-probs per response token
    beta, gamma = 2.0, 0.8
    losses = simpo_loss(chosen, rejected, beta, gamma, label_smoothing)
    for i in range(16):
        z = beta * (chosen[i].item() - rejected[i].item()) - gamma  # SimPO eq. 6: a margin gamma on the rewards
        expected = -(1 - label_smoothing) * math.log(1 / (1 + math.exp(-z))) \
                   - label_smoothing * math.log(1 / (1 + math.exp(z)))
        assert losses[i].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_orpo_loss_for_fixed_logps_equals_the_papers_formula():
    torch.manual_seed(0)
    chosen, rejected = -3 * torch.rand(2, 16, dtype=torch.float64)
    lam = 0.25
    losses, log_odds = orpo_loss(chosen, rejected, lam)
    for i in range(16):
        p_chosen, p_rejected = math.exp(chosen[i].item()), math.exp(rejected[i].item())
        odds_ratio = (p_chosen / (1 - p_chosen)) / (p_rejected / (1 - p_rejected))  # ORPO eq. 5 and 6
        expected = -chosen[i].item() - lam * math.log(1 / (1 + 1 / odds_ratio))  # L_SFT + lambda L_OR (eq. 7)
        assert log_odds[i].item() == pytest.approx(math.log(odds_ratio), rel=1e-9)
        assert losses[i].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_bad_dpo_options_are_user_errors():
    with pytest.raises(UserError, match="label_smoothing applies to --dpo.loss sigmoid and simpo only"):
        DPOArgs(loss="ipo", label_smoothing=0.1)
    with pytest.raises(UserError, match="--dpo.beta must be above 0"):
        DPOArgs(beta=0.0)


# ------------------------------------------------------------------------------------------ data


def test_labels_cover_only_the_final_response_and_its_end_of_turn(tiny_chat_model_dir, tmp_path):
    tokenizer = Tokenizer(tiny_chat_model_dir)
    row = hh_rows(1)[0]
    pairs, _ = Preference(json_path=write_rows(tmp_path / "row.jsonl", [row]), val_split_fraction=0.0).setup(
        tokenizer, 4096)
    prompt_text = row["chosen"][:row["chosen"].rfind(MARKER)]
    turns = re.split(r"\n\n(Human|Assistant): ", prompt_text)[1:]
    messages = [{"role": {"Human": "user", "Assistant": "assistant"}[speaker], "content": content.strip()}
                for speaker, content in zip(turns[::2], turns[1::2])]
    pair = pairs[0]
    for side in ("chosen", "rejected"):
        ids, labels = pair[f"{side}_input_ids"], pair[f"{side}_labels"]
        response = row[side][row[side].rfind(MARKER) + len(MARKER):].strip()
        assert tokenizer.decode(labels[labels != -100].tolist()) == response + "<|im_end|>"
        first = int((labels != -100).nonzero()[0])
        assert tokenizer.decode(ids[:first].tolist()) == tokenizer.apply_chat_template(messages)
        assert (labels[first:] != -100).sum() == (labels != -100).sum()  # one contiguous response


def test_hh_transcripts_prompt_chosen_rejected_and_messages_rows_give_the_same_pairs(tiny_chat_model_dir,
                                                                                      demo_pairs, tmp_path):
    rows = hh_rows(40)
    split = []  # as the hh-rlhf prompt/chosen/rejected split is made: the prompt ends with the last marker
    conversations = []
    for row in rows:
        cut = row["chosen"].rfind(MARKER) + len(MARKER)
        split.append({"prompt": row["chosen"][:cut], "chosen": row["chosen"][cut:],
                      "rejected": row["rejected"][cut:]})
        sides = {}
        for side in ("chosen", "rejected"):
            turns = re.split(r"\n\n(Human|Assistant):", row[side])[1:]
            sides[side] = [{"role": {"Human": "user", "Assistant": "assistant"}[speaker], "content": text.strip()}
                           for speaker, text in zip(turns[::2], turns[1::2])]
        conversations.append(sides)
    tokenizer = Tokenizer(tiny_chat_model_dir)
    for name, form in (("split", split), ("messages", conversations)):
        pairs, _ = Preference(json_path=write_rows(tmp_path / f"{name}.jsonl", form),
                              val_split_fraction=0.0).setup(tokenizer, 256)
        assert len(pairs) == len(rows)
        for i in range(len(rows)):
            for key, value in demo_pairs[i].items():
                assert torch.equal(pairs[i][key], value), (name, i, key)


def test_long_pairs_lose_prompt_tokens_from_the_left_and_response_tokens_from_the_right(tiny_chat_model_dir,
                                                                                         demo_pairs):
    data = Preference(json_path=DEMO, val_split_fraction=0.0)
    short, _ = data.setup(Tokenizer(tiny_chat_model_dir), 64)
    full_lengths = [max(len(p["chosen_input_ids"]), len(p["rejected_input_ids"])) for p in demo_pairs]
    assert data.num_truncated == sum(length > 64 for length in full_lengths) > 0 and data.num_dropped == 0
    for pair, whole in zip(short, demo_pairs):
        for side in ("chosen", "rejected"):
            ids, labels = pair[f"{side}_input_ids"], pair[f"{side}_labels"]
            whole_ids, whole_labels = whole[f"{side}_input_ids"], whole[f"{side}_labels"]
            assert len(ids) <= 64
            prompt, whole_prompt = int((labels != -100).nonzero()[0]), int((whole_labels != -100).nonzero()[0])
            # the kept prompt is the end of the prompt, the kept response the start of the response
            assert torch.equal(ids[:prompt], whole_ids[whole_prompt - prompt:whole_prompt])
            assert torch.equal(ids[prompt:], whole_ids[whole_prompt:whole_prompt + len(ids) - prompt])
            assert prompt >= min(32, whole_prompt)  # a long response never pushes the prompt below half


def test_bad_preference_row_is_one_line_error_with_exit_2(tiny_chat_model_dir, tmp_path):
    bad = write_rows(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"},
                                              {"prompt": "a", "chosen": "b", "refused": "c"}])
    result = subprocess.run([sys.executable, "-m", "litllm", "finetune", "dpo", str(tiny_chat_model_dir),
                             "--data", "Preference", "--data.json_path", str(bad), "--out_dir", str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {bad}:2: missing key 'rejected'") and "--data.rejected_key" in last


HUMAN = "\n\nHuman: hi\n\nAssistant: "


@pytest.mark.parametrize("row, message", [
    ({"chosen": HUMAN + "a", "rejected": "\n\nHuman: bye\n\nAssistant: b"}, "must share the prompt"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "'chosen' must be a string or a list of messages, got int"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q"}]}, "'rejected' must end with an assistant message"),
    ({"chosen": "plain text", "rejected": "other"}, "'chosen' is a string but no '\\n\\nHuman:"),
    ({"prompt": [{"role": "human", "content": "q"}], "chosen": "a", "rejected": "b"},
     "prompt[0].role must be one of system, user, assistant, tool"),
    (["a list"], "expected an object, got list"),
])
def test_bad_preference_rows_name_file_line_and_key(tiny_chat_model_dir, tmp_path, row, message):
    path = write_rows(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, row])
    with pytest.raises(UserError) as error:
        Preference(json_path=path).setup(Tokenizer(tiny_chat_model_dir), 128)
    assert str(error.value).startswith(f"{path}:2: ") and message in str(error.value)


# ------------------------------------------------------------------------------------------ log-probs


def test_sequence_logprobs_sum_only_response_tokens_as_transformers_scores_them(tiny_chat_model_dir, demo_pairs):
    from transformers import AutoModelForCausalLM

    batch = demo_pairs.collate([demo_pairs[i] for i in range(3)])  # 6 rows of different lengths, padded
    model = load_model(tiny_chat_model_dir).train()
    ours = sequence_logprobs(model, batch, chunk_size=37)
    reference = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logps = reference(batch["input_ids"]).logits[:, :-1].log_softmax(-1)
    targets = batch["labels"][:, 1:]
    token_logps = logps.gather(2, targets.clamp(min=0).unsqueeze(2)).squeeze(2)
    expected = (token_logps * (targets != -100)).sum(1)
    torch.testing.assert_close(ours, expected, atol=1e-3, rtol=1e-5)

    # the chunked, recomputed-in-backward path has the gradients of plain full-logits autograd
    weights = torch.linspace(-1, 1, len(ours))
    (ours * weights).sum().backward()
    ours_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    full = model(batch["input_ids"])[:, :-1].log_softmax(-1).gather(2, targets.clamp(min=0).unsqueeze(2)).squeeze(2)
    ((full * (targets != -100)).sum(1) * weights).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours_grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_logprobs_through_a_frozen_output_layer_equal_the_recomputing_path_with_two_products(autocast, temperature):
    """LinearLogprobs (LoRA's frozen lm_head) gives token_logprobs_and_entropy's log-probs and entropies, bit for bit,
    and their gradient for the hidden states, with two (tokens x hidden) @ (hidden x vocab) products where the
    recomputing path runs three."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    lm_head = torch.nn.Linear(32, 1000, bias=False).requires_grad_(False)
    hidden, targets = torch.randn(13, 32, requires_grad=True), torch.randint(0, 1000, (13,))
    incoming = torch.linspace(-1, 1, 13)  # a different gradient for each token's log-prob
    results = {}
    for name in ("fused", "recomputing"):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), FlopCounterMode(display=False) as flops:
            if name == "fused":
                logprobs, entropy = LinearLogprobs.apply(hidden, lm_head.weight, targets, 5, temperature, True)
            else:
                logprobs, entropy = token_logprobs_and_entropy(lm_head, hidden, targets, 5, temperature)
            (grad,) = torch.autograd.grad((logprobs * incoming).sum(), hidden)
        results[name] = logprobs, entropy, grad, flops.get_total_flops()
    (fused, fused_entropy, fused_grad, fused_flops) = results["fused"]
    (plain, plain_entropy, plain_grad, plain_flops) = results["recomputing"]
    assert fused.dtype == torch.float32 and torch.equal(fused, plain) and torch.equal(fused_entropy, plain_entropy)
    assert not fused_entropy.requires_grad
    rtol = 1.6e-2 if autocast else 1.3e-6  # as assert_close's for the dtype, relative to the largest element
    torch.testing.assert_close(fused_grad, plain_grad, rtol=rtol, atol=rtol * float(plain_grad.abs().max()))
    product = 2 * 13 * 32 * 1000
    assert (fused_flops, plain_flops) == (2 * product, 3 * product)


@pytest.mark.parametrize("scoring", ["dpo", "grpo"])
def test_lora_logprobs_take_the_fused_path_with_the_same_gradients(tiny_chat_model_dir, demo_pairs, scoring):
    """DPO's sequence log-probs, and GRPO's token log-probs at its sampling temperature with their entropies, through
    LoRA's frozen lm_head: the numbers and LoRA gradients of the recomputing path, one output-layer product fewer."""
    from torch.utils.flop_counter import FlopCounterMode

    from litllm.finetune.grpo import completion_logps

    batch = demo_pairs.collate([demo_pairs[i] for i in range(2)])
    model = apply_lora(load_model(tiny_chat_model_dir), LoRAConfig(r=4, dropout=0.0))  # lm_head frozen
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    lora_params = [param for name, param in model.named_parameters() if "lora_" in name]
    results = {}
    for name, head_trains in (("fused", False), ("recomputing", True)):  # a trained lm_head cannot take the fused path
        model.lm_head.weight.requires_grad_(head_trains)
        with FlopCounterMode(display=False) as flops:
            if scoring == "dpo":
                logps, entropy = sequence_logprobs(model, batch, chunk_size=37), None
            else:
                logps, entropy, _ = completion_logps(model, batch, 37, temperature=0.7, entropy=True)
            grads = torch.autograd.grad((logps * torch.linspace(-1, 2, len(logps))).sum(), lora_params)
        results[name] = logps, entropy, grads, flops.get_total_flops()
    (fused, fused_entropy, fused_grads, fused_flops) = results["fused"]
    (plain, plain_entropy, plain_grads, plain_flops) = results["recomputing"]
    assert torch.equal(fused, plain)
    assert scoring == "dpo" or torch.equal(fused_entropy, plain_entropy)
    for ours, reference in zip(fused_grads, plain_grads):  # float32 rounding of sums over tokens
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
    # one output-layer product fewer: the recomputation of the logits in backward
    vocab, hidden_size = model.lm_head.weight.shape
    assert plain_flops - fused_flops == 2 * count_row_targets(batch).sum() * hidden_size * vocab


def test_adapter_disabled_reference_equals_the_base_models_logps(tiny_chat_model_dir, demo_pairs):
    batch = demo_pairs.collate([demo_pairs[i] for i in range(2)])
    base = sequence_logprobs(load_model(tiny_chat_model_dir), batch, chunk_size=64)
    model = apply_lora(load_model(tiny_chat_model_dir), LoRAConfig(r=4, dropout=0.0, targets=["q_proj", "v_proj",
                                                                                              "lm_head"]))
    def objective(model, batch):
        return dpo_objective(model, batch, DPOArgs(), chunk_size=64)

    with torch.no_grad():
        loss, metrics = objective(model, batch)  # fresh adapters (B = 0): the policy is the reference
        assert loss.item() == pytest.approx(2 * math.log(2))
        assert all(value.item() == 0 for name, value in metrics.items() if name.startswith("rewards/"))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
        with disable_adapters(model):
            torch.testing.assert_close(sequence_logprobs(model, batch, chunk_size=64), base, atol=1e-4, rtol=0)
        adapted = sequence_logprobs(model, batch, chunk_size=64)
        assert (adapted - base).abs().min() > 0.1
        _, metrics = objective(model, batch)
        chosen, rejected = (adapted - base).chunk(2)
        torch.testing.assert_close(metrics["rewards/margins"], 0.1 * (chosen - rejected).sum(), atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------------------------------ runs


def run_dpo(model_dir, out_dir, resume=False, **kwargs):
    """4 steps of 4 pairs on 20 real pairs (4 held out): the reference pass over them, where there is one, is short."""
    data_path = out_dir.parent / "pairs.jsonl"
    if not data_path.exists():
        write_rows(data_path, hh_rows(20))
    train = TrainArgs(global_batch_size=4, micro_batch_size=2, max_steps=4, max_seq_length=96, lr=1e-3,
                      warmup_steps=1, eval_interval=2, save_interval=2)
    return dpo.setup(model_dir, out_dir=out_dir, data=Preference(json_path=data_path, val_split_fraction=0.2),
                     train=train, resume="auto" if resume else False, **kwargs)


def assert_resumes_with_the_same_metrics(model_dir, out_dir, tmp_path, **kwargs):
    """A copy of the run cut back to its step-2 checkpoint, resumed, logs exactly what the whole run logged after."""
    resumed = tmp_path / "resumed"
    shutil.copytree(out_dir, resumed, ignore=shutil.ignore_patterns("final", "logs"))
    run_dpo(model_dir, resumed, resume=True, **kwargs)
    for key in ("loss", "rewards/margins", "logps/chosen", "val_loss", "val_rewards/accuracies"):
        expected = {step: value for step, value in logged(out_dir, key).items() if step > 2}
        assert expected and logged(resumed, key) == expected, key


def test_full_dpo_saves_a_hf_dir_transformers_loads_and_resumes_exactly(tiny_chat_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    final = run_dpo(tiny_chat_model_dir, tmp_path / "run", full=True)
    # the reference log-probs were computed from the starting model: at step 1 the policy equals it
    assert abs(logged(tmp_path / "run", "rewards/margins")[1]) < 1e-4
    assert logged(tmp_path / "run", "rewards/accuracies")[4] > 0
    ours = load_model(final)
    reference = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    x = torch.tensor([Tokenizer(final).encode("How do I pick a lock?")])
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x).logits, atol=1e-4, rtol=0)
        assert not torch.allclose(ours(x), load_model(tiny_chat_model_dir)(x))  # the weights moved
    assert_resumes_with_the_same_metrics(tiny_chat_model_dir, tmp_path / "run", tmp_path, full=True)


@pytest.mark.parametrize("parallel", [["--strategy", "fsdp"], ["--tensor_parallel", "2"]], ids=["fsdp", "tp"])
def test_two_processes_split_the_reference_scoring_and_validation_and_equal_one(parallel, tiny_chat_model_dir,
                                                                                tmp_path):
    """Full DPO on 2 processes, sharded (FSDP) or each block split (tensor parallel): the reference log-probs and
    validation scored in shares (a tensor-parallel pair scores one share together) equal one process's."""
    run_dpo(tiny_chat_model_dir, tmp_path / "one", full=True)
    result = litllm("finetune", "dpo", tiny_chat_model_dir, "--data", "Preference", "--data.json_path",
                    tmp_path / "pairs.jsonl", "--data.val_split_fraction", "0.2", "--train.global_batch_size", "4",
                    "--train.micro_batch_size", "2", "--train.max_steps", "4", "--train.max_seq_length", "96",
                    "--train.lr", "1e-3", "--train.warmup_steps", "1", "--train.eval_interval", "2",
                    "--train.save_interval", "2", "--full", "true", "--devices", "2", *parallel,
                    "--out_dir", tmp_path / "two")
    assert result.returncode == 0, result.stderr
    # the gradient reductions round differently: weights after a step differ in float32's last bits, and a log-prob
    # summed over ~100 tokens (~ -200) resolves to ~2e-5, so a reward, 0.1 x a difference of two, to ~4e-6
    for key in ("loss", "rewards/margins", "logps/chosen", "val_loss", "val_rewards/margins"):
        expected = logged(tmp_path / "one", key)
        assert expected and logged(tmp_path / "two", key) == pytest.approx(expected, rel=1e-5, abs=5e-6), key


def test_dpo_from_an_sft_adapter_uses_it_as_reference_and_resumes_exactly(tiny_chat_model_dir, tmp_path):
    torch.manual_seed(0)
    sft = apply_lora(load_model(tiny_chat_model_dir), LoRAConfig(r=4, dropout=0.0))
    for name, param in sft.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.2)  # an adapter that changes the model a lot
    save_adapter(sft, LoRAConfig(r=4, dropout=0.0), tmp_path / "sft", base_checkpoint=tiny_chat_model_dir)

    run_dpo(tiny_chat_model_dir, tmp_path / "run", adapter=tmp_path / "sft")
    # had the reference been the base model, the SFT adapter alone would give large rewards at step 1
    assert abs(logged(tmp_path / "run", "rewards/chosen")[1]) < 1e-4
    assert abs(logged(tmp_path / "run", "rewards/margins")[1]) < 1e-4
    assert (tmp_path / "run" / "final" / "adapter_config.json").is_file()
    assert_resumes_with_the_same_metrics(tiny_chat_model_dir, tmp_path / "run", tmp_path, adapter=tmp_path / "sft")


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_losses_score_no_reference_and_resume_exactly(loss, tiny_chat_model_dir, tmp_path,
                                                                     monkeypatch):
    """--full true, where DPO would score every pair with the starting model first: SimPO and ORPO score each
    micro-batch once, with the policy, and nothing else."""
    calls = {"objective": 0, "scored": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(dpo, "dpo_objective", counted("objective", dpo.dpo_objective))
    monkeypatch.setattr(dpo, "sequence_logprobs", counted("scored", dpo.sequence_logprobs))
    args = DPOArgs(loss=loss, beta=2.0 if loss == "simpo" else 0.1)
    run_dpo(tiny_chat_model_dir, tmp_path / "run", full=True, dpo=args)
    assert calls["scored"] == calls["objective"] > 0
    run = tmp_path / "run"
    if loss == "orpo":  # the chosen response's NLL per token is minus its average log-prob
        assert logged(run, "nll_loss")[1] == pytest.approx(-logged(run, "logps/chosen")[1], rel=1e-5)
        assert set(logged(run, "log_odds_ratio")) == set(logged(run, "log_odds_chosen")) == set(logged(run))
    assert_resumes_with_the_same_metrics(tiny_chat_model_dir, run, tmp_path, full=True, dpo=args)


@pytest.mark.slow
def test_lora_dpo_on_real_pairs_raises_held_out_reward_accuracy_and_margin(smollm2_dir, tmp_path):
    """SmolLM2 with fresh LoRA adapters, 8 steps of 8 hh-rlhf pairs; judged on 30 pairs it never trained on."""
    train = TrainArgs(global_batch_size=8, micro_batch_size=8, max_steps=8, max_seq_length=32, lr=2e-3,
                      min_lr=2e-3, warmup_steps=0, grad_clip=None, eval_interval=None)
    data = Preference(json_path=DEMO, val_split_fraction=0.1)
    dpo.setup(smollm2_dir, out_dir=tmp_path, data=data, train=train, lora=LoRAConfig(r=8, alpha=16, dropout=0.0))
    # at step 1 the policy is the reference (the adapters start at zero): no reward, no accuracy, loss log 2
    assert logged(tmp_path, "rewards/margins")[1] == 0 and logged(tmp_path, "rewards/accuracies")[1] == 0
    assert logged(tmp_path, "loss")[1] == pytest.approx(math.log(2))
    assert logged(tmp_path, "val_rewards/accuracies")[8] > 0.5
    assert logged(tmp_path, "val_rewards/margins")[8] > 0
    assert logged(tmp_path, "val_loss")[8] < math.log(2)
