"""Compiled training (--train.compile) as specified: the same losses as eager training."""
from pathlib import Path

import pytest

from runs import litllm, logged

DATA = Path(__file__).resolve().parents[1] / "data"


def test_compiled_lora_training_equals_eager_with_dropout(tiny_chat_model_dir, tmp_path):
    # LoRA's default dropout 0.05: compiled, its masks were once read before being drawn, and q/k/v's were merged
    # into one (see lora_dropout.dropout_mask). Every example is longer than 32 tokens, so every batch has one shape and the
    # blocks compile once.
    args = ["--data", "JSON", "--data.json_path", DATA / "alpaca_demo.json", "--data.mask_prompt", "false",
            "--train.max_seq_length", "32",
            "--train.global_batch_size", "2", "--train.micro_batch_size", "2", "--train.max_steps", "12",
            "--train.lr", "1e-3", "--train.warmup_steps", "0", "--train.eval_interval", "null"]
    for name, compile in (("eager", "false"), ("compiled", "true")):
        run = litllm("finetune", "lora", tiny_chat_model_dir, *args, "--out_dir", tmp_path / name,
                     "--train.compile", compile)
        assert run.returncode == 0, run.stderr[-3000:]
    eager, compiled = logged(tmp_path / "eager"), logged(tmp_path / "compiled")
    assert len(eager) == 12
    assert compiled == pytest.approx(eager, rel=1e-5)
