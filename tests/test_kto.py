"""KTO as TRL's KTOTrainer does it: the paper's loss against a detached, clamped KL estimate from mismatched
completions, preference pairs as desirable and undesirable examples, one-line errors, exact resume."""
import json
import math
import shutil
from pathlib import Path

import lightning_fabric as L
import pytest
import torch
from safetensors.torch import load_file

from litllm.checkpoint import load_model
from litllm.commands import main
from litllm.data import Preference, Unpaired, UnpairedDataset
from litllm.data.kto import kl_partners
from litllm.errors import UserError
from litllm.finetune import kto
from litllm.finetune.kto import KTOArgs, kl_estimate, kl_sequences, kto_loss, kto_objective
from litllm.lora import LoRAConfig, apply_lora, disable_adapters, save_adapter
from litllm.tokenizer import Tokenizer
from litllm.training.args import TrainArgs
from litllm.training.losses import sequence_logprobs
from runs import logged

DATA = Path(__file__).resolve().parents[1] / "data"
PAIRS = DATA / "ko_preference_demo.jsonl"


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def pair_rows(n):
    return [json.loads(line) for line in PAIRS.read_text().splitlines()[:n]]


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


@pytest.fixture(scope="module")
def fabric():
    return L.Fabric(accelerator="cpu", devices=1)


# ------------------------------------------------------------------------------------------ the loss


def test_loss_for_fixed_logps_equals_the_papers_formula(fabric):
    torch.manual_seed(0)
    policy, reference = -50 * torch.rand(2, 16, dtype=torch.float64)
    desirable = torch.arange(16) % 3 != 0
    beta, desirable_weight, undesirable_weight = 0.3, 1.5, 0.7
    for kl in (0.0, 2.5):
        losses, rewards = kto_loss(policy, reference, torch.tensor(kl, dtype=torch.float64), desirable, beta,
                                   desirable_weight, undesirable_weight)
        for i in range(16):
            r = policy[i].item() - reference[i].item()  # the log-ratio: KTO's implicit reward over beta
            if desirable[i]:  # KTO eq. 7: v = lambda_D sigmoid(beta (r - z)), loss = lambda_D - v
                expected = desirable_weight * (1 - sigmoid(beta * (r - kl)))
            else:  # v = lambda_U sigmoid(beta (z - r))
                expected = undesirable_weight * (1 - sigmoid(beta * (kl - r)))
            assert losses[i].item() == pytest.approx(expected, rel=1e-12)
            assert rewards[i].item() == pytest.approx(beta * r, rel=1e-12)

    # z: the mean mismatched log-ratio, detached, and never below 0
    policy_kl = torch.tensor([-3.0, -5.0, -4.0], dtype=torch.float64, requires_grad=True)
    reference_kl = torch.tensor([-4.0, -4.5, -4.1], dtype=torch.float64)
    z = kl_estimate(fabric, policy_kl, reference_kl)
    assert z.item() == pytest.approx((1.0 - 0.5 + 0.1) / 3) and not z.requires_grad
    assert kl_estimate(fabric, reference_kl, policy_kl).item() == 0  # a negative estimate is clamped


def test_bad_kto_options_are_user_errors():
    for name in ("beta", "desirable_weight", "undesirable_weight"):
        with pytest.raises(UserError, match=f"--kto.{name} must be above 0"):
            KTOArgs(**{name: 0.0})


# ------------------------------------------------------------------------------------------ data


def test_pairs_become_desirable_and_undesirable_examples_with_mismatched_kl_partners(tiny_chat_model_dir, tmp_path):
    tokenizer = Tokenizer(tiny_chat_model_dir)
    pairs, _ = Preference(json_path=write_rows(tmp_path / "pairs.jsonl", pair_rows(7)),
                          val_split_fraction=0.0).setup(tokenizer, 256)
    examples = UnpairedDataset.from_pairs(pairs)
    assert len(examples) == 14 and examples.num_desirable == 7
    for i in range(7):  # every chosen response first, desirable, then every rejected one
        assert bool(examples[i]["desirable"]) and not examples[7 + i]["desirable"]
        assert torch.equal(examples[i]["input_ids"], pairs[i]["chosen_input_ids"])
        assert torch.equal(examples[7 + i]["labels"], pairs[i]["rejected_labels"])

    # TRL's rotation by one within groups of the micro-batch size; a trailing group of one joins the one before
    assert kl_partners(14, 4) == [3, 0, 1, 2, 7, 4, 5, 6, 11, 8, 9, 10, 13, 12]
    assert kl_partners(9, 4) == [3, 0, 1, 2, 8, 4, 5, 6, 7]
    for n, size in ((14, 4), (9, 4), (5, 2), (7, 3)):
        partners = kl_partners(n, size)
        assert all(p != i for i, p in enumerate(partners)) and sorted(partners) == list(range(n))

    examples.add_kl_sequences(group_size=4, max_seq_length=256)
    for i, partner in enumerate(kl_partners(14, 4)):
        example, other = examples[i], examples[partner]
        own_prompt = int((example["labels"] != -100).nonzero()[0])
        other_prompt = int((other["labels"] != -100).nonzero()[0])
        # the example's own prompt, then the partner's completion, scored on that completion only
        assert torch.equal(example["kl_input_ids"], torch.cat([example["input_ids"][:own_prompt],
                                                                other["input_ids"][other_prompt:]]))
        assert torch.equal(example["kl_labels"][own_prompt:], other["labels"][other_prompt:])
        assert (example["kl_labels"][:own_prompt] == -100).all()
        assert i % 7 != partner % 7  # never the other half of its own pair: a different prompt


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "completion": "c"}, "missing key 'label' (keys: prompt, completion); pick another with "
                                         "--data.label_key"),
    ({"prompt": "p", "completion": "c", "label": "true"}, "'label' must be true (desirable) or false"),
    ({"prompt": "p", "completion": "c", "label": 1}, "a JSON boolean; got 1"),
    ({"prompt": "p", "answer": "c", "label": True}, "missing key 'completion'"),
    ({"completion": [{"role": "user", "content": "q"}], "label": False},
     "'completion' must end with an assistant message"),
])
def test_bad_unpaired_rows_name_file_line_and_key(tiny_chat_model_dir, tmp_path, row, message):
    path = write_rows(tmp_path / "feedback.jsonl", [{"prompt": "a", "completion": "b", "label": True}, row])
    with pytest.raises(UserError) as error:
        Unpaired(json_path=path).setup(Tokenizer(tiny_chat_model_dir), 128)
    assert str(error.value).startswith(f"{path}:2: ") and message in str(error.value)


def test_micro_batch_of_one_is_refused_in_one_line_with_exit_2(tiny_chat_model_dir, tmp_path, capsys):
    feedback = write_rows(tmp_path / "feedback.jsonl", [{"prompt": "a", "completion": "b", "label": True}] * 4)
    with pytest.raises(SystemExit) as exit:
        main(["finetune", "kto", str(tiny_chat_model_dir), "--data", "Unpaired", "--data.json_path", str(feedback),
              "--train.micro_batch_size", "1", "--out_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: --train.micro_batch_size must be at least 2 for KTO, got 1")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ the reference


def test_adapter_disabled_reference_equals_the_base_models_logps_of_the_kl_sequences(tiny_chat_model_dir, fabric,
                                                                                      tmp_path):
    pairs, _ = Preference(json_path=write_rows(tmp_path / "pairs.jsonl", pair_rows(2)),
                          val_split_fraction=0.0).setup(Tokenizer(tiny_chat_model_dir), 128)
    examples = UnpairedDataset.from_pairs(pairs)
    examples.add_kl_sequences(group_size=4, max_seq_length=128)
    batch = examples.collate([examples[i] for i in range(4)])
    base = load_model(tiny_chat_model_dir)
    base_logps, base_kl = sequence_logprobs(base, batch, 64), sequence_logprobs(base, kl_sequences(batch), 64)
    model = apply_lora(load_model(tiny_chat_model_dir), LoRAConfig(r=4, dropout=0.0, targets=["q_proj", "v_proj",
                                                                                              "lm_head"]))
    args = KTOArgs(beta=0.1)
    with torch.no_grad():
        loss, metrics = kto_objective(fabric, model, batch, args, chunk_size=64)
        # fresh adapters (B = 0): the policy is the reference, every log-ratio and the KL estimate are 0
        assert loss.item() == pytest.approx(4 * 0.5) and metrics["kl"].item() == 0
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
        with disable_adapters(model):
            torch.testing.assert_close(sequence_logprobs(model, kl_sequences(batch), 64), base_kl, atol=1e-4, rtol=0)
        adapted_kl = sequence_logprobs(model, kl_sequences(batch), 64)
        assert (adapted_kl - base_kl).abs().min() > 0.1
        _, metrics = kto_objective(fabric, model, batch, args, chunk_size=64)
        expected_kl = (adapted_kl - base_kl).mean().clamp(min=0)
        torch.testing.assert_close(metrics["kl"], 4 * expected_kl, atol=1e-4, rtol=1e-5)
        adapted = sequence_logprobs(model, batch, 64)
        chosen = batch["desirable"]
        torch.testing.assert_close(metrics["rewards/chosen"], 0.1 * (adapted - base_logps)[chosen].sum(),
                                   atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------------------------------ runs


def run_kto(model_dir, out_dir, data_path, resume=False, **kwargs):
    """3 steps of 4 examples; the reference scoring before training covers the ones the run uses."""
    train = TrainArgs(global_batch_size=4, micro_batch_size=2, max_steps=3, max_seq_length=64, lr=1e-3,
                      warmup_steps=1, eval_interval=2, save_interval=2)
    return kto.setup(model_dir, out_dir=out_dir, data=Unpaired(json_path=data_path, val_split_fraction=0.25),
                     train=train, resume="auto" if resume else False, **kwargs)


def test_kto_from_an_adapter_logs_trls_metrics_and_resumes_to_the_same_adapter(tiny_chat_model_dir, tmp_path,
                                                                               capsys):
    torch.manual_seed(0)
    sft = apply_lora(load_model(tiny_chat_model_dir), LoRAConfig(r=4, dropout=0.0))
    for name, param in sft.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.2)  # an adapter that changes the model a lot
    save_adapter(sft, LoRAConfig(r=4, dropout=0.0), tmp_path / "sft", base_checkpoint=tiny_chat_model_dir)
    rows = pair_rows(8)  # 8 desirable and 4 undesirable completions
    feedback = write_rows(tmp_path / "feedback.jsonl",
                          [{"prompt": row["prompt"], "completion": row["chosen"], "label": True} for row in rows]
                          + [{"prompt": row["prompt"], "completion": row["rejected"], "label": False}
                             for row in rows[:4]])

    run = tmp_path / "run"
    run_kto(tiny_chat_model_dir, run, feedback, adapter=tmp_path / "sft")
    out = capsys.readouterr().out
    assert "KTO: 6 desirable and 3 undesirable training examples" in out
    assert "outside the [1, 4/3] the KTO paper recommends; set --kto.desirable_weight 0.583" in out
    header = (run / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    names = ["kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"]
    assert set(names + ["loss", "val_loss"] + [f"val_{name}" for name in names]) <= set(header)
    # the reference is the SFT adapter, scored before training: at step 1 the policy equals it
    assert abs(logged(run, "rewards/chosen")[1]) < 1e-4 and logged(run, "kl")[1] < 1e-4

    resumed = tmp_path / "resumed"  # the run as it stood after its step-2 checkpoint, continued
    shutil.copytree(run, resumed, ignore=shutil.ignore_patterns("final", "logs"))
    run_kto(tiny_chat_model_dir, resumed, feedback, resume=True, adapter=tmp_path / "sft")
    for key in ("loss", "kl", "logps/chosen", "val_loss", "val_rewards/margins"):
        expected = {step: value for step, value in logged(run, key).items() if step > 2}
        assert expected and logged(resumed, key) == expected, key
    final, resumed_final = (load_file(d / "final" / "adapter_model.safetensors") for d in (run, resumed))
    assert final.keys() == resumed_final.keys()
    assert all(torch.equal(final[name], resumed_final[name]) for name in final)
