"""`litllm cp`: a copied task script runs on its own, from a directory outside the repository."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from litllm.cp import SCRIPTS, cp

ROOT = Path(__file__).parent.parent


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH cleared: the script must find litllm as an installed package, not as the repo's folder
    env = {**os.environ, "PYTHONPATH": ""}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_cp_lists_every_script():
    result = run([sys.executable, "-m", "litllm", "cp", "--list"], ROOT)
    assert result.returncode == 0
    assert [line.split()[0] for line in result.stdout.splitlines()] == list(SCRIPTS)


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_copied_script_shows_its_options(script, tmp_path):
    dest = tmp_path / "my_script.py"
    cp(script, dest)
    result = run([sys.executable, str(dest), "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "--config" in result.stdout


def test_cp_does_not_overwrite_without_asking(tmp_path):
    dest = tmp_path / "mine.py"
    dest.write_text("my edits")
    result = run([sys.executable, "-m", "litllm", "cp", "finetune/lora", str(dest)], tmp_path)
    assert result.returncode == 2 and "--overwrite" in result.stderr and dest.read_text() == "my edits"
    assert run([sys.executable, "-m", "litllm", "cp", "finetune/lora", str(dest), "--overwrite", "true"],
               tmp_path).returncode == 0
    assert dest.read_text() == (ROOT / "litllm" / "finetune" / "lora.py").read_text()


@pytest.mark.parametrize("script, args", [
    ("finetune/lora", ["--data", "JSON", "--data.json_path", str(ROOT / "data" / "alpaca_demo.json")]),
    ("finetune/dpo", ["--data", "Preference", "--data.json_path", str(ROOT / "data" / "ko_preference_demo.jsonl")]),
])
def test_copied_training_script_trains_outside_the_repository(script, args, tiny_chat_model_dir, tmp_path):
    dest = tmp_path / "my_script.py"
    cp(script, dest)
    result = run([sys.executable, str(dest), str(tiny_chat_model_dir), *args, "--out_dir", "out",
                  "--train.max_steps", "2", "--train.global_batch_size", "2", "--train.micro_batch_size", "2",
                  "--train.max_seq_length", "64", "--train.eval_max_batches", "1"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "final").is_dir()


def test_copied_pretrain_script_trains_outside_the_repository(tiny_chat_model_dir, tmp_path):
    dest = tmp_path / "pretrain.py"
    cp("pretrain", dest)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((ROOT / "data" / "tiny_shakespeare.txt").read_text()[:20000])
    result = run([sys.executable, str(dest), "--initial_checkpoint", str(tiny_chat_model_dir),
                  "--data.paths", str(corpus), "--data.cache_dir", str(tmp_path / "cache"), "--out_dir", "out",
                  "--train.max_steps", "2", "--train.global_batch_size", "2", "--train.micro_batch_size", "2",
                  "--train.max_seq_length", "64", "--train.eval_max_batches", "1"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "final" / "config.json").is_file()
