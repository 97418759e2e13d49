"""Pretraining as specified: the prepared corpus, named configs, exact resume, DDP and FSDP = one process, HF
outputs."""
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from litllm.checkpoint import load_model
from litllm.config import NAMED_CONFIGS, PARAMETER_COUNTS
from litllm.data import TextCorpus, TokenWindows
from litllm.model import GPT
from litllm.tokenizer import Tokenizer
from runs import litllm, logged

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Real text in every input form: a folder of text files, a JSONL file with `text` fields."""
    root = tmp_path_factory.mktemp("corpus")
    shakespeare = (DATA / "tiny_shakespeare.txt").read_text()
    korean = (DATA / "ko_nsmc_reviews.txt").read_text().splitlines()
    (root / "plays").mkdir()
    (root / "plays" / "a.txt").write_text(shakespeare[:12000])
    (root / "plays" / "b.txt").write_text(shakespeare[12000:20000])
    (root / "plays" / "notes.bin").write_bytes(b"\xff\xfe not text")  # not a text suffix: skipped
    rows = [{"text": line, "id": i} for i, line in enumerate(korean[:60])]
    (root / "reviews.jsonl").write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n")
    documents = [shakespeare[:12000], shakespeare[12000:20000], *korean[:60]]
    return root, documents


def test_prepared_corpus_round_trips_every_document(tiny_chat_model_dir, corpus, tmp_path):
    root, documents = corpus
    tokenizer = Tokenizer(tiny_chat_model_dir)
    data = TextCorpus(paths=[root / "plays", root / "reviews.jsonl"], num_workers=2, cache_dir=tmp_path / "two")
    prepared = data.prepare(tokenizer)
    meta = json.loads((prepared / "meta.json").read_text())
    tokens = np.memmap(prepared / "tokens.bin", dtype=meta["dtype"], mode="r")
    assert meta["dtype"] == "uint16" and meta["documents"] == len(documents) == 62
    assert tokens[-1] == tokenizer.eos_id  # EOS after every document, the last one too
    ends = np.flatnonzero(tokens == tokenizer.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    decoded = [tokenizer.decode(tokens[start:end].tolist()) for start, end in zip(starts, ends)]
    assert decoded == documents
    assert tokenizer.encode(documents[2], add_special_tokens=False) == tokens[starts[2]:ends[2]].tolist()

    # one worker writes the same file: the order is the documents', not the workers'
    serial = TextCorpus(paths=[root / "plays", root / "reviews.jsonl"], num_workers=1, cache_dir=tmp_path / "one")
    assert (serial.prepare(tokenizer) / "tokens.bin").read_bytes() == (prepared / "tokens.bin").read_bytes()

    # the validation slice is the last val_fraction of the stream, cut into the same windows
    train, val = data.setup(tokenizer, max_seq_length=64)
    assert len(train.tokens) == meta["train_tokens"] == len(tokens) - int(len(tokens) * 0.05)
    assert np.array_equal(np.concatenate([train.tokens, val.tokens]), tokens) and len(val) > 0


def test_second_run_reads_the_cache_and_a_changed_input_is_tokenized_again(tiny_chat_model_dir, corpus, tmp_path,
                                                                           capsys):
    root, _ = corpus
    text = tmp_path / "text.txt"
    text.write_text((DATA / "tiny_shakespeare.txt").read_text()[:5000])
    tokenizer = Tokenizer(tiny_chat_model_dir)
    data = TextCorpus(paths=text, cache_dir=tmp_path / "cache")
    first = data.prepare(tokenizer)
    written = (first / "tokens.bin").stat().st_mtime_ns
    capsys.readouterr()
    assert data.prepare(tokenizer) == first
    assert "Using the tokenized corpus cached" in capsys.readouterr().out
    assert (first / "tokens.bin").stat().st_mtime_ns == written  # not rewritten
    text.write_text(text.read_text() + "\nEpilogue.")
    changed = data.prepare(tokenizer)
    assert changed != first and "Tokenized 1 documents" in capsys.readouterr().out
    assert tokenizer.decode(np.fromfile(changed / "tokens.bin", dtype=np.uint16)[:-1].tolist()) == text.read_text()


def test_windows_make_every_token_after_the_first_a_target_exactly_once():
    tokens = np.arange(23, dtype=np.uint16)
    windows = TokenWindows(tokens, length=5)
    batch = windows.collate([windows[i] for i in range(len(windows))])
    assert batch["input_ids"].shape == (5, 5) and torch.equal(batch["input_ids"], batch["labels"])
    targets = batch["labels"][:, 1:].flatten().tolist()  # the loss predicts token t + 1 from position t
    assert targets == list(range(1, 21))  # 21, 22 do not fill a window


@pytest.mark.parametrize("name", list(NAMED_CONFIGS))
def test_named_configs_build_the_parameter_counts_they_claim(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # shapes only: no memory, even for the 1B model
        ours = GPT(NAMED_CONFIGS[name])
        hf_config = NAMED_CONFIGS[name].to_hf()
        reference = AutoModelForCausalLM.from_config(AutoConfig.for_model(hf_config.pop("model_type"), **hf_config))
    assert sum(p.numel() for p in ours.parameters()) == PARAMETER_COUNTS[name]
    assert sum(p.numel() for p in reference.parameters()) == PARAMETER_COUNTS[name]


@pytest.mark.parametrize("tied", [True, False])
def test_flops_per_token_equals_torch_flop_counter_on_a_training_step(tied):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from litllm.config import Config
    from litllm.training.loop import training_flops_per_token

    model = GPT(Config(vocab_size=256, hidden_size=64, intermediate_size=96, n_layers=2, n_heads=4, n_kv_heads=2,
                       tie_embeddings=tied))
    batch, length = 2, 32
    # the math kernel spells attention as matmuls the counter sees; the full (not causal-halved) matrix, as PaLM
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 256, (batch, length))).sum().backward()
    assert counter.get_total_flops() == training_flops_per_token(model, length) * batch * length


def pretrain_args(out_dir, corpus_root, cache_dir, *extra):
    return ["--data.paths", f"[{corpus_root / 'plays'},{corpus_root / 'reviews.jsonl'}]", "--data.cache_dir", cache_dir,
            "--data.val_fraction", "0.1", "--out_dir", out_dir, "--train.global_batch_size", "4",
            "--train.micro_batch_size", "2", "--train.max_seq_length", "64", "--train.warmup_steps", "2",
            "--train.lr", "1e-3", "--train.eval_interval", "4", "--train.eval_max_batches", "2", *extra]


LORA = ["--lora.r", "4", "--lora.dropout", "0", "--train_embeddings", "true"]


@pytest.fixture(scope="module")
def lora_reference(tiny_chat_model_dir, corpus, tmp_path_factory):
    """An uninterrupted continued-pretraining run with LoRA and trainable embeddings (no dropout: one process and
    two draw different masks, and the FSDP test compares them)."""
    root, _ = corpus
    out_dir = tmp_path_factory.mktemp("lora-reference")
    result = litllm("pretrain", "--initial_checkpoint", tiny_chat_model_dir, *LORA,
                    *pretrain_args(out_dir, root, out_dir.parent / "cache", "--train.max_steps", "6",
                                   "--train.save_interval", "2", "--train.eval_interval", "3"))
    assert result.returncode == 0, result.stderr
    return out_dir, result.stdout


def test_lora_run_killed_mid_training_resumes_with_the_same_loss_curve(tiny_chat_model_dir, corpus, lora_reference,
                                                                       tmp_path):
    root, _ = corpus
    reference, _ = lora_reference
    args = ["--initial_checkpoint", tiny_chat_model_dir, *LORA,
            *pretrain_args(tmp_path / "run", root, reference.parent / "cache", "--train.max_steps", "6",
                           "--train.save_interval", "2", "--train.eval_interval", "3")]
    process = subprocess.Popen([sys.executable, "-m", "litllm", "pretrain", *map(str, args)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (tmp_path / "run" / "step-000002").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # no chance to clean up: only atomic checkpoints survive
    process.wait()
    assert not (tmp_path / "run" / "final").exists(), "the run finished before it could be killed"

    resumed = litllm("pretrain", *args, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from" in resumed.stdout
    assert len(logged(reference)) == 6 and logged(tmp_path / "run") == logged(reference)  # every step, exactly
    assert logged(tmp_path / "run", "val_loss") == logged(reference, "val_loss")
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_lora_with_embeddings_writes_a_merged_hf_model_that_transformers_loads(tiny_chat_model_dir, lora_reference):
    from transformers import AutoModelForCausalLM

    out_dir, stdout = lora_reference
    final = out_dir / "final"
    assert (final / "tokenizer.json").is_file() and (final / "adapter" / "adapter_config.json").is_file()
    ours, base = load_model(final), load_model(tiny_chat_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    x = torch.randint(0, 49152, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x).logits, atol=1e-4, rtol=0)
    assert not torch.equal(ours.embed_tokens.weight, base.embed_tokens.weight)  # embeddings trained in full
    assert not torch.equal(ours.layers[0].attn.q_proj.weight, base.layers[0].attn.q_proj.weight)  # adapters merged
    assert torch.equal(ours.layers[0].attn_norm.weight, base.layers[0].attn_norm.weight)  # the rest stayed frozen
    val = logged(out_dir, "val_loss")
    assert 0 in val and "step 0: val loss" in stdout and logged(out_dir, "val_ppl")[6] == pytest.approx(
        float(np.exp(val[6])))


@pytest.fixture(scope="module")
def one_process(tiny_chat_model_dir, corpus, tmp_path_factory):
    """Three full-training steps on one process: what data parallelism must reproduce."""
    root, _ = corpus
    out_dir = tmp_path_factory.mktemp("one-process")
    result = litllm("pretrain", "--initial_checkpoint", tiny_chat_model_dir,
                    *pretrain_args(out_dir, root, out_dir / "cache", *THREE_STEPS, "--devices", "1"))
    assert result.returncode == 0, result.stderr
    return out_dir


# two micro-batches per process and step: gradients accumulate without syncing, then sync once
THREE_STEPS = ["--train.max_steps", "3", "--train.eval_interval", "3", "--train.global_batch_size", "8"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one_process_on_the_same_global_batch(tiny_chat_model_dir, corpus, one_process,
                                                                  strategy, tmp_path):
    root, _ = corpus
    two = litllm("pretrain", "--initial_checkpoint", tiny_chat_model_dir,
                 *pretrain_args(tmp_path, root, tmp_path / "cache", *THREE_STEPS, "--devices", "2",
                                "--strategy", strategy))
    assert two.returncode == 0, two.stderr
    one_loss, two_loss = logged(one_process), logged(tmp_path)
    assert one_loss.keys() == two_loss.keys() == {1, 2, 3}
    for step in one_loss:
        assert two_loss[step] == pytest.approx(one_loss[step], rel=1e-6, abs=0)
    assert logged(tmp_path, "val_loss")[3] == pytest.approx(logged(one_process, "val_loss")[3], rel=1e-6)
    # under FSDP each process held half of every weight: the checkpoint gathers them whole
    weights_one, weights_two = load_model(one_process / "final"), load_model(tmp_path / "final")
    start = load_model(tiny_chat_model_dir)
    for (name, a), b, c in zip(weights_one.named_parameters(), weights_two.parameters(), start.parameters()):
        assert not torch.equal(a, c), name  # every weight trained
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)


def test_fsdp_resumes_a_one_process_checkpoint_and_one_process_resumes_an_fsdp_checkpoint(
        tiny_chat_model_dir, corpus, lora_reference, tmp_path):
    """LoRA with trained (tied) embeddings; the optimizer state is saved whole, keyed by parameter name."""
    root, _ = corpus
    reference, _ = lora_reference
    args = ["--initial_checkpoint", tiny_chat_model_dir, *LORA,
            *pretrain_args(tmp_path / "fsdp", root, reference.parent / "cache", "--train.max_steps", "6",
                           "--train.save_interval", "2", "--train.eval_interval", "3")]
    shutil.copytree(reference / "step-000002", tmp_path / "fsdp" / "step-000002")
    sharded = litllm("pretrain", *args, "--resume", "true", "--devices", "2", "--strategy", "fsdp")
    assert sharded.returncode == 0, sharded.stderr
    expected = logged(reference)
    assert logged(tmp_path / "fsdp") == pytest.approx({step: expected[step] for step in (3, 4, 5, 6)}, rel=1e-6)

    args[args.index("--out_dir") + 1] = tmp_path / "one"
    shutil.copytree(tmp_path / "fsdp" / "step-000004", tmp_path / "one" / "step-000004")
    single = litllm("pretrain", *args, "--resume", "true")
    assert single.returncode == 0, single.stderr
    assert logged(tmp_path / "one") == pytest.approx({5: expected[5], 6: expected[6]}, rel=1e-6)
    for name, tensor in load_model(tmp_path / "one" / "final").state_dict().items():
        torch.testing.assert_close(tensor, load_model(reference / "final").state_dict()[name], atol=1e-6, rtol=1e-5,
                                   msg=name)


def test_llama_tiny_from_scratch_learns_and_loads_in_transformers(smollm2_dir, corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    root, _ = corpus
    result = litllm("pretrain", "--model_name", "llama-tiny", "--tokenizer_dir", smollm2_dir,
                    *pretrain_args(tmp_path, root, tmp_path / "cache", "--train.max_steps", "4",
                                   "--train.max_seq_length", "32", "--train.lr", "3e-3"),
                    "--sample_prompt", "ROMEO:")
    assert result.returncode == 0, result.stderr
    assert "Sample:\nROMEO:" in result.stdout
    final = tmp_path / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["eos_token_id"] == Tokenizer(smollm2_dir).eos_id and (final / "tokenizer.json").is_file()
    val = logged(tmp_path, "val_loss")
    assert val[4] < val[0] - 0.5  # from a uniform guess (ln 49152 = 10.8) towards the text's statistics
    ours = load_model(final)
    assert sum(p.numel() for p in ours.parameters()) == PARAMETER_COUNTS["llama-tiny"]
    reference = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    x = torch.randint(0, 49152, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x).logits, atol=1e-4, rtol=0)


def test_user_mistakes_are_one_line_errors(tiny_chat_model_dir, tmp_path, capsys):
    from litllm.commands import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text key"}\n')
    with pytest.raises(SystemExit) as exit_code:
        main(["pretrain", "--initial_checkpoint", str(tiny_chat_model_dir), "--data.paths", str(bad),
              "--data.cache_dir", str(tmp_path / "cache"), "--out_dir", str(tmp_path / "out")])
    assert exit_code.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1] == (
        f"error: {bad}:2: missing key 'text' (found: body); pick another with --data.text_key")
    with pytest.raises(SystemExit) as exit_code:
        main(["pretrain", "--data.paths", str(bad), "--out_dir", str(tmp_path / "out2")])
    assert exit_code.value.code == 2 and "--model_name NAME" in capsys.readouterr().err
