"""Fine-tuning as specified: accumulation, packing, exact resume, QLoRA, outputs other tools load."""
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning_fabric as L
import pytest
import torch
from safetensors.torch import load_file

from litllm.checkpoint import load_model
from litllm.data import JSON
from litllm.lora import LoRAConfig, apply_lora
from litllm.tokenizer import Tokenizer
from litllm.finetune.lora import next_token_loss
from litllm.training.loop import StepUnits
from litllm.training.losses import count_targets
from runs import litllm, logged

DATA = Path(__file__).resolve().parents[1] / "data"


def tokenized(model_dir, max_seq_length=96, json_path=DATA / "alpaca_demo.json", **data_kwargs):
    data = JSON(json_path=json_path, val_split_fraction=0.0, **data_kwargs)
    train, _ = data.setup(Tokenizer(model_dir), max_seq_length)
    return train


def gradients(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_grad_accumulation_equals_large_batch(tiny_chat_model_dir):
    fabric = L.Fabric(devices=1, accelerator="cpu", precision="32-true")
    train = tokenized(tiny_chat_model_dir)
    examples = [train[i] for i in range(4)]
    counts = [int((e["labels"][1:] != -100).sum()) for e in examples]
    assert len(set(counts)) > 1  # uneven numbers of target tokens per example

    model = fabric.setup_module(load_model(tiny_chat_model_dir).train())

    def step_gradients(micro_batches):  # what a training script does with one step's micro-batches
        model.zero_grad()
        units = StepUnits(fabric, sum(count_targets(batch) for batch in micro_batches))
        loss_sum = 0.0
        for batch in micro_batches:
            loss = next_token_loss(model, batch, chunk_size=64)
            fabric.backward(loss * units.loss_scale)
            loss_sum += loss.detach()
        return units.mean({"loss": loss_sum})["loss"], gradients(model)

    one_big, expected = step_gradients([train.collate(examples)])
    four_small, actual = step_gradients([train.collate([e]) for e in examples])
    assert one_big == pytest.approx(four_small, abs=1e-6)
    assert expected.keys() == actual.keys() and expected
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_packed_loss_equals_unpacked_loss(tiny_chat_model_dir, tmp_path):
    examples = tmp_path / "examples.json"  # 40 examples: packing mixes them, so no subset of the rows would do
    examples.write_text(json.dumps(json.loads((DATA / "alpaca_demo.json").read_text())[:40]))
    unpacked = tokenized(tiny_chat_model_dir, max_seq_length=256, json_path=examples, mask_prompt=False)
    packed = tokenized(tiny_chat_model_dir, max_seq_length=256, json_path=examples, mask_prompt=False, packing=True)
    n_documents = int(sum(packed[i]["document_ids"].max() + 1 for i in range(len(packed))))
    assert n_documents == len(unpacked) and len(packed) < len(unpacked)

    model = load_model(tiny_chat_model_dir).train()
    losses = {}
    grads = {}
    for name, data in (("unpacked", unpacked), ("packed", packed)):
        model.zero_grad()
        total = sum(next_token_loss(model, data.collate([data[i]]), chunk_size=128) for i in range(len(data)))
        total.backward()
        losses[name], grads[name] = total.item(), gradients(model)
    assert losses["packed"] == pytest.approx(losses["unpacked"], rel=1e-5)
    for name in grads["unpacked"]:
        torch.testing.assert_close(grads["packed"][name], grads["unpacked"][name], atol=1e-4, rtol=1e-4, msg=name)


def test_packing_keeps_documents_apart(tiny_chat_model_dir):
    """Logits of a document inside a packed row equal those of the document alone."""
    packed = tokenized(tiny_chat_model_dir, max_seq_length=256, packing=True)[0]
    model = load_model(tiny_chat_model_dir)
    with torch.no_grad():
        logits = model(packed["input_ids"][None], position_ids=packed["position_ids"][None],
                       document_ids=packed["document_ids"][None])[0]
        for doc in range(int(packed["document_ids"].max()) + 1):
            where = packed["document_ids"] == doc
            alone = model(packed["input_ids"][where][None])[0]
            torch.testing.assert_close(logits[where], alone, atol=1e-5, rtol=0)


def train_args(out_dir, *extra):
    return ["--data", "JSON", "--data.json_path", DATA / "alpaca_demo.json", "--out_dir", out_dir,
            "--train.global_batch_size", "4", "--train.micro_batch_size", "2", "--train.max_seq_length", "96",
            "--train.warmup_steps", "2", "--train.lr", "1e-3", "--train.eval_interval", "4", *extra]


def start_run(model_dir, out_dir, *args) -> subprocess.Popen:
    command = [sys.executable, "-m", "litllm", "finetune", "lora", str(model_dir), *map(str, train_args(out_dir, *args))]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process) -> None:
    deadline = time.time() + 600
    while not condition() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)


def test_interrupted_lora_runs_resume_with_the_same_loss_curve(tiny_chat_model_dir, tmp_path):
    """Killed (SIGKILL: only the atomic checkpoints survive), stopped (SIGTERM: a checkpoint at the next step
    boundary, exit 143), or resumed from a damaged newest checkpoint (the newest intact one is taken, with a
    warning): each time the resumed run logs exactly what the uninterrupted one did, step by step."""
    steps = ["--train.max_steps", "10", "--train.save_interval", "3", "--train.keep_last", "2"]
    reference = litllm("finetune", "lora", tiny_chat_model_dir, *train_args(tmp_path / "ref", *steps))
    assert reference.returncode == 0, reference.stderr
    expected = logged(tmp_path / "ref")
    assert len(expected) == 10
    assert sorted(p.name for p in (tmp_path / "ref").glob("step-*")) == ["step-000006", "step-000009"]  # keep_last

    killed = start_run(tiny_chat_model_dir, tmp_path / "killed", *steps)
    wait_for(lambda: (tmp_path / "killed" / "step-000003").exists(), killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "final").exists(), "the run finished before it could be killed"

    # no periodic checkpoints here (the interval does not change the losses): whatever is saved, SIGTERM saved it
    stopped = start_run(tiny_chat_model_dir, tmp_path / "stopped", *steps, "--train.save_interval", "100")
    wait_for(lambda: max(logged(tmp_path / "stopped"), default=0) >= 4, stopped)
    stopped.send_signal(signal.SIGTERM)
    assert stopped.wait() == 143, stopped.stderr.read()
    saved = [int(p.name.removeprefix("step-")) for p in (tmp_path / "stopped").glob("step-*")]
    assert saved == [max(logged(tmp_path / "stopped"))] and 4 <= saved[0] < 10, saved  # the step it stopped at

    damaged = tmp_path / "damaged"
    for name in ("step-000006", "step-000009"):
        shutil.copytree(tmp_path / "ref" / name, damaged / name)
    adapter = damaged / "step-000009" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-100])  # a disk that lost the end of a file

    for run_dir in ("killed", "stopped", "damaged"):
        resumed = litllm("finetune", "lora", tiny_chat_model_dir, *train_args(tmp_path / run_dir, *steps,
                                                                           "--resume", "auto"))
        assert resumed.returncode == 0, resumed.stderr
        if run_dir == "damaged":
            assert "skipping the checkpoint" in resumed.stderr and "step-000006 (step 6)" in resumed.stdout
        expected_here = {step: loss for step, loss in expected.items() if run_dir != "damaged" or step > 6}
        assert logged(tmp_path / run_dir) == expected_here, run_dir  # every step, exactly
        assert not [p.name for p in (tmp_path / run_dir).iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_two_process_fsdp_lora_equals_one_process(tiny_chat_model_dir, tmp_path):
    """Each process holds half of every weight and adapter; padded batches differ in length between processes; each
    validates its share of the validation set."""
    steps = ["--train.max_steps", "3", "--train.global_batch_size", "8", "--lora.dropout", "0"]
    one = litllm("finetune", "lora", tiny_chat_model_dir, *train_args(tmp_path / "one", *steps))
    assert one.returncode == 0, one.stderr
    two = litllm("finetune", "lora", tiny_chat_model_dir, *train_args(tmp_path / "two", *steps, "--devices", "2",
                                                                      "--strategy", "fsdp"))
    assert two.returncode == 0, two.stderr
    assert len(logged(tmp_path / "one")) == 3
    assert logged(tmp_path / "two") == pytest.approx(logged(tmp_path / "one"), rel=1e-6)
    # validation split over the processes (5 micro-batches: 3 and 2, in lockstep) gives one process's number
    assert len(logged(tmp_path / "one", "val_loss")) == 1
    assert logged(tmp_path / "two", "val_loss") == pytest.approx(logged(tmp_path / "one", "val_loss"), rel=1e-6)
    adapters = [load_file(tmp_path / run / "final" / "adapter_model.safetensors") for run in ("one", "two")]
    assert adapters[0].keys() == adapters[1].keys()
    for name in adapters[0]:
        torch.testing.assert_close(adapters[1][name], adapters[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_fsdp_mixed_precision_gathers_bf16_copies_of_float32_shards(tiny_chat_model_dir, tmp_path):
    """bf16-mixed under FSDP: blocks compute with bfloat16 copies of the weights (half the bytes gathered), while the
    shards and their gradients stay float32; two processes train as one, within bfloat16's precision."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from litllm.training.fabric import FullySharded

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))
        model = FullySharded(1, torch.bfloat16).shard_blocks(load_model(tiny_chat_model_dir), mesh)
        seen = []
        model.layers[0].attn.q_proj.register_forward_pre_hook(lambda module, args: seen.append(module.weight.dtype))
        model(torch.tensor([[1, 2, 3]])).sum().backward()
        shard = model.layers[0].attn.q_proj.weight
        assert seen == [torch.bfloat16] and shard.dtype == shard.grad.dtype == torch.float32
    finally:
        dist.destroy_process_group()

    steps = ["--train.max_steps", "3", "--precision", "bf16-mixed", "--train.eval_max_batches", "2"]
    one = litllm("finetune", "full", tiny_chat_model_dir, *train_args(tmp_path / "one", *steps))
    assert one.returncode == 0, one.stderr
    two = litllm("finetune", "full", tiny_chat_model_dir, *train_args(tmp_path / "two", *steps, "--devices", "2",
                                                                      "--strategy", "fsdp"))
    assert two.returncode == 0, two.stderr
    assert len(logged(tmp_path / "one")) == 3
    assert logged(tmp_path / "two") == pytest.approx(logged(tmp_path / "one"), rel=4e-3)  # bfloat16: 8 bits


def test_fsdp_processes_each_read_their_own_shards_and_train_as_one(smollm2_dir, tmp_path):
    """Built on the meta device and sharded, each process reads only its rows of each weight from the files: an
    untied model with biases, and MLP weights of 97 rows, which split unevenly (49 and 48)."""
    from hf_models import save_tiny_hf_model
    from litllm.checkpoint import copy_tokenizer_files

    model_dir = tmp_path / "qwen2"
    save_tiny_hf_model("qwen2", model_dir, vocab_size=49152, intermediate_size=97)
    copy_tokenizer_files(smollm2_dir, model_dir)
    steps = ["--train.max_steps", "2", "--train.eval_max_batches", "2"]
    one = litllm("finetune", "full", model_dir, *train_args(tmp_path / "one", *steps))
    assert one.returncode == 0, one.stderr
    two = litllm("finetune", "full", model_dir, *train_args(tmp_path / "two", *steps, "--devices", "2",
                                                           "--strategy", "fsdp"))
    assert two.returncode == 0, two.stderr
    for key in ("loss", "val_loss"):
        assert logged(tmp_path / "one", key) and logged(tmp_path / "two", key) == pytest.approx(
            logged(tmp_path / "one", key), rel=1e-6), key
    saved, reference = (load_file(tmp_path / run / "final" / "model.safetensors") for run in ("two", "one"))
    assert saved.keys() == reference.keys()
    for name in saved:  # gathered back whole, in the layout transformers reads
        # k's bias gets no gradient (softmax ignores a shift shared by every key): its float32 rounding noise, ~1e-11,
        # is all Adam sees, so its steps (lr * g / (|g| + eps), up to ~1e-6 here) differ with the order of the sums;
        # 1e-5 is still a hundredth of one real step at lr 1e-3
        atol = 1e-5 if name.endswith("k_proj.bias") else 1e-6
        torch.testing.assert_close(saved[name], reference[name], atol=atol, rtol=1e-5, msg=name)


def test_tensor_parallel_processes_split_each_block_and_train_as_one(tiny_chat_model_dir, smollm2_dir, tmp_path):
    """--tensor_parallel 2: each of 2 processes holds half of every block's q/k/v/o and MLP weights (2 of 4 heads,
    1 of 2 key/value heads); the losses, the saved weights and their logits equal one process's."""
    steps = ["--train.max_steps", "2", "--train.eval_max_batches", "2"]
    one = litllm("finetune", "full", tiny_chat_model_dir, *train_args(tmp_path / "one", *steps))
    assert one.returncode == 0, one.stderr
    two = litllm("finetune", "full", tiny_chat_model_dir, *train_args(tmp_path / "tp", *steps, "--devices", "2",
                                                                      "--tensor_parallel", "2"))
    assert two.returncode == 0, two.stderr
    for key in ("loss", "val_loss"):
        assert logged(tmp_path / "one", key) and logged(tmp_path / "tp", key) == pytest.approx(
            logged(tmp_path / "one", key), rel=1e-6), key
    x = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():  # the checkpoint, gathered whole, loads in one process
        torch.testing.assert_close(load_model(tmp_path / "tp" / "final")(x), load_model(tmp_path / "one" / "final")(x),
                                   atol=1e-5, rtol=0)

    nine_heads = litllm("finetune", "full", smollm2_dir, *train_args(tmp_path / "nine", "--devices", "2",
                                                                     "--tensor_parallel", "2"))
    assert nine_heads.returncode == 2 and not (tmp_path / "nine").exists()
    assert nine_heads.stderr.strip().splitlines() == [
        "error: --tensor_parallel 2: the model's 9 attention heads do not split evenly over 2 devices; use a "
        "--tensor_parallel that divides 9 heads, 3 key/value heads and 1536 MLP columns"]


def test_two_process_run_resumes_each_process_with_its_own_dropout_state(tiny_chat_model_dir, tmp_path):
    steps = ["--train.max_steps", "4", "--train.save_interval", "2", "--devices", "2", "--strategy", "fsdp"]
    reference = litllm("finetune", "lora", tiny_chat_model_dir, *train_args(tmp_path / "ref", *steps))
    assert reference.returncode == 0, reference.stderr
    shutil.copytree(tmp_path / "ref" / "step-000002", tmp_path / "resumed" / "step-000002")
    resumed = litllm("finetune", "lora", tiny_chat_model_dir,
                     *train_args(tmp_path / "resumed", *steps, "--resume", "true"))
    assert resumed.returncode == 0, resumed.stderr
    expected = logged(tmp_path / "ref")
    assert logged(tmp_path / "resumed") == {3: expected[3], 4: expected[4]}  # exactly


def test_lora_adapter_loads_in_peft_with_the_same_logits(tiny_chat_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = litllm("finetune", "lora", tiny_chat_model_dir,
                    *train_args(tmp_path, "--train.max_steps", "3", "--lora.targets", "[q_proj,v_proj,down_proj]"))
    assert result.returncode == 0, result.stderr
    assert "litllm chat" in result.stdout
    adapter = tmp_path / "final"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "tokenizer.json").is_file()
    from litllm import LLM

    ours = LLM.load(tiny_chat_model_dir, adapter=adapter)
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, adapter).eval()
    x = torch.tensor([ours.tokenizer.encode("Give three tips for staying healthy.")])
    with torch.no_grad():
        torch.testing.assert_close(ours.model(x), reference(x).logits, atol=1e-5, rtol=0)
        assert not torch.allclose(ours.model(x), load_model(tiny_chat_model_dir)(x))  # the adapter learned


def test_full_finetune_output_loads_in_transformers_with_the_same_logits(tiny_chat_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    result = litllm("finetune", "full", tiny_chat_model_dir, *train_args(tmp_path, "--train.max_steps", "3"))
    assert result.returncode == 0, result.stderr
    final = tmp_path / "final"
    ours = load_model(final)
    reference = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    x = torch.randint(0, 49152, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x).logits, atol=1e-4, rtol=0)
        assert not torch.allclose(ours(x), load_model(tiny_chat_model_dir)(x))  # the weights moved


def test_qlora_nf4_training_lowers_the_loss_on_real_data(tiny_chat_model_dir, tmp_path):
    result = litllm("finetune", "lora", tiny_chat_model_dir,
                    *train_args(tmp_path, "--train.max_steps", "8", "--quantize", "bnb.nf4",
                                "--data.val_split_fraction", "0.5"))
    assert result.returncode == 0, result.stderr
    val = logged(tmp_path, "val_loss")
    assert val[8] < val[4]


def test_qlora_nf4_lowers_the_training_loss_of_smollm2_on_real_data(smollm2_dir):
    import bitsandbytes as bnb

    from litllm.quantize import quantize_model

    model = quantize_model(load_model(smollm2_dir), "bnb.nf4")
    apply_lora(model, LoRAConfig(r=8, dropout=0.0))
    assert isinstance(model.layers[0].attn.q_proj.base, bnb.nn.Linear4bit)
    data = tokenized(smollm2_dir, max_seq_length=64)
    batch = data.collate([data[i] for i in range(4)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(5):  # the same batch each step: the adapters must fit it
        loss = next_token_loss(model.train(), batch, chunk_size=128) / count_targets(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_existing_out_dir_is_never_overwritten_silently(tiny_chat_model_dir, tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    result = litllm("finetune", "lora", tiny_chat_model_dir, *train_args(tmp_path, "--train.max_steps", "1"))
    assert result.returncode == 2 and "--overwrite true" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("weight_trains", [False, True])
def test_chunked_cross_entropy_equals_full_logits_cross_entropy(weight_trains, autocast):
    """Against the loss as transformers computes it: under autocast, bfloat16 logits made float32 for the loss."""
    from litllm.training.losses import cross_entropy_sum

    torch.manual_seed(0)
    lm_head = torch.nn.Linear(32, 1000, bias=False).requires_grad_(weight_trains)
    hidden = torch.randn(3, 17, 32, requires_grad=True)
    labels = torch.randint(0, 1000, (3, 17))
    labels[0, :5] = -100  # a masked prompt
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ours = cross_entropy_sum(lm_head, hidden, labels, chunk_size=7)
    (ours * 0.37).backward()  # an incoming gradient other than 1, as a loss scale gives
    ours_grads = [hidden.grad.clone()] + ([lm_head.weight.grad.clone()] if weight_trains else [])
    hidden.grad, lm_head.weight.grad = None, None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = lm_head(hidden[:, :-1]).float()
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 1000), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100, reduction="sum")
    (expected * 0.37).backward()
    expected_grads = [hidden.grad] + ([lm_head.weight.grad] if weight_trains else [])
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-6)
    for a, b in zip(ours_grads, expected_grads):
        assert a.dtype == b.dtype == torch.float32  # the parameters' dtype, as autograd gives them
        # under autocast both round softmax's gradient to bfloat16 before the matmul, in other chunkings
        tolerance = {"atol": 1.6e-2 * float(b.abs().max()), "rtol": 1.6e-2} if autocast else {"atol": 1e-6,
                                                                                              "rtol": 1e-5}
        torch.testing.assert_close(a, b, **tolerance)


def test_the_kept_bfloat16_output_weight_follows_every_change_of_the_weight():
    """On CPU the chunked loss keeps the output layer's bfloat16 cast from one call to the next (losses.ChunkBuffers):
    each call's loss is the one from a fresh cast, while the weight is unchanged, after an in-place change, after its
    data is replaced, for another weight of the same shape, and for a trained weight after a fused AdamW step (which
    leaves the weight's version as it was)."""
    from litllm.training.losses import linear_cross_entropy

    torch.manual_seed(0)
    hidden, targets = torch.randn(10, 16), torch.randint(0, 300, (10,))
    weight, other = torch.randn(300, 16), torch.randn(300, 16)
    trained = torch.nn.Parameter(torch.randn(300, 16))
    optimizer = torch.optim.AdamW([trained], lr=0.1, fused=True)

    def optimizer_step():
        trained.grad = torch.randn_like(trained)
        optimizer.step()

    calls = [(weight, None), (weight, None), (weight, lambda: weight.add_(0.5)),
             (weight, lambda: setattr(weight, "data", other * 2)), (other, None), (other, None), (weight, None),
             (trained, None), (trained, optimizer_step), (trained, optimizer_step)]
    for w, change in calls:
        if change is not None:
            change()
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            loss = linear_cross_entropy(hidden, w, targets, chunk_size=4)[0]
            logits = torch.nn.functional.linear(hidden.bfloat16(), w.bfloat16()).float()
        expected = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        torch.testing.assert_close(loss, expected, atol=0, rtol=1e-6)


@pytest.mark.parametrize("weight_trains", [False, True])
def test_chunked_cross_entropy_without_gradients_runs_only_the_logits_product(weight_trains):
    """Validation (torch.no_grad()) gets the training loss but does not compute the gradients training needs."""
    from torch.utils.flop_counter import FlopCounterMode

    from litllm.training.losses import cross_entropy_sum

    torch.manual_seed(0)
    lm_head = torch.nn.Linear(32, 1000, bias=False).requires_grad_(weight_trains)
    hidden, labels = torch.randn(2, 9, 32, requires_grad=True), torch.randint(0, 1000, (2, 9))
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        loss = cross_entropy_sum(lm_head, hidden, labels, chunk_size=5)
    assert flops.get_total_flops() == 2 * (2 * 8) * 32 * 1000  # (16 targets, 32) @ (32, 1000), nothing else
    assert not loss.requires_grad
    torch.testing.assert_close(loss, cross_entropy_sum(lm_head, hidden, labels, chunk_size=5).detach())


def test_logged_tokens_per_sec_is_the_rate_of_the_steps_since_the_last_log(monkeypatch):
    """A slow first step (start-up costs) does not pull down the rate logged later: each log covers its own steps."""
    from litllm.training.args import TrainArgs
    from litllm.training.loop import StepLog

    fabric = L.Fabric(devices=1, accelerator="cpu", precision="32-true")
    logged_rows = []
    monkeypatch.setattr(fabric, "log_dict", lambda metrics, step: logged_rows.append(metrics))
    log = StepLog(fabric, TrainArgs(log_interval=2), total_steps=4, start_step=0)
    for step, seconds in enumerate([9.0, 1.0, 0.5, 0.5], start=1):  # 100 tokens a step
        log.step(step, {"loss": 1.0}, tokens=100, seconds=seconds)
    log.close()
    assert [(row["step"], row["tokens_per_sec"]) for row in logged_rows] == [(2, 200 / 10.0), (4, 200 / 1.0)]


KEEP_FREED_MEMORY = """
import resource, torch
from litllm.memory import keep_freed_memory
def faults(rounds):  # page faults in the last of `rounds` of four 64 MB tensors made, filled and freed
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(4):
            x = torch.ones(16 << 20); del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults(3), keep_freed_memory(), faults(8))
"""


CHUNKED_LOGPROBS_HEAP = """
import ctypes, torch
from litllm.memory import keep_freed_memory
from litllm.training.losses import token_logprobs
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks "
                                                    "fordblks keepcost".split()]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
keep_freed_memory()
torch.set_num_threads(2)  # (with one OpenMP thread the old heap grew in some processes only)
generator = torch.Generator().manual_seed(0)
lm_head = torch.nn.Linear(32, 50000, bias=False)  # a chunk's logits: 256 x 50000 float32, 51.2 MB
hidden, targets = torch.randn(30 * 256, 32, generator=generator), torch.randint(0, 50000, (30 * 256,), generator=generator)
with torch.no_grad():
    token_logprobs(lm_head, hidden[:256], targets[:256], 256)  # the first chunk's tensors in the heap
    heap = mallinfo2().arena
    for _ in range(3):
        logprobs, greedy = token_logprobs(lm_head, hidden, targets, 256)
    growth = mallinfo2().arena - heap
    logits = lm_head(hidden[:256])
    exact = torch.equal(logprobs[:256], logits.log_softmax(-1).gather(1, targets[:256, None]).squeeze(1))
print(growth, exact, torch.equal(greedy[:256], logits.argmax(-1) == targets[:256]))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")
def test_chunked_logprobs_without_gradients_do_not_grow_the_kept_heap():
    """token_logprobs without gradients (evaluate, reference models), under keep_freed_memory's settings, over 30 chunks
    three times: glibc's heap grows by less than 20 chunks' logits. With each chunk's results kept as pieces to the end
    it grew by 1.6-2.8 GB here (31-55 chunks' logits, 6 processes of 6), as a chunk's small results took memory from
    the logits freed before them (`litllm evaluate`'s perplexity peaked at 3.2-4.5 GB RSS, against 1.4-1.7 now); now by
    0.05-0.61 GB. The log-probs and greedy flags are those of the whole log-softmax, to the bit."""
    import os

    environment = {name: value for name, value in os.environ.items() if name != "OMP_NUM_THREADS"}  # (conftest's)
    done = subprocess.run([sys.executable, "-c", CHUNKED_LOGPROBS_HEAP], env=environment, capture_output=True,
                          text=True, check=True)
    growth, exact, greedy = done.stdout.split()
    assert int(growth) < 20 * 51.2e6 and exact == greedy == "True", done.stdout


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc settings")
@pytest.mark.parametrize("environment", ["default", "user-settings", "KEEP_FREED_MEMORY_ENV"])
def test_cpu_training_keeps_freed_memory_for_its_next_tensors(environment):
    """After keep_freed_memory (setup_fabric and `litllm evaluate` call it on CPU), large tensors freed and made again,
    as training steps do, take the same pages back (no page faults) once the heap has settled (a few rounds), where by
    default each one is mapped anew every time (a fault per 4 KiB page: 16384 per 64 MB). glibc settings the user made
    in the environment are left alone; KEEP_FREED_MEMORY_ENV (benchmarks give it to the reference) does from the
    process's start what the call does."""
    import os

    from litllm.memory import KEEP_FREED_MEMORY_ENV

    settings = {"default": {}, "user-settings": {"MALLOC_TRIM_THRESHOLD_": "1"},
                "KEEP_FREED_MEMORY_ENV": KEEP_FREED_MEMORY_ENV}[environment]
    done = subprocess.run([sys.executable, "-c", KEEP_FREED_MEMORY], env={**os.environ, **settings},
                          capture_output=True, text=True, check=True)
    before, kept, after = (int(n) if n.isdigit() else n for n in done.stdout.split())
    fresh_pages = 4 * 16384  # every 64 MB tensor on fresh pages
    assert kept == str(environment == "default")
    if environment == "KEEP_FREED_MEMORY_ENV":  # fewer from the first rounds on (the heap still settling)
        assert before < fresh_pages
    else:
        assert before >= fresh_pages
    if environment == "user-settings":
        assert after >= fresh_pages
    else:
        assert after < 1000
