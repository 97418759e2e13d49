"""Compiled training (--train.compile) as specified: the same losses as eager training."""
from pathlib import Path

import pytest
import torch

from hf_models import save_tiny_hf_model
from litllm.checkpoint import load_model
from litllm.lora import LoRAConfig, LoRALinear, apply_lora, draw_block_dropout
from runs import litllm, logged

DATA = Path(__file__).resolve().parents[1] / "data"


def test_compiled_lora_training_equals_eager_with_dropout(tiny_chat_model_dir, tmp_path):
    # LoRA's default dropout 0.05: compiled, its masks were once read before being drawn, and q/k/v's were merged
    # into one (see lora_dropout.dropout_mask); now they are drawn before each block (lora.draw_block_dropout). Every
    # example is longer than 32 tokens, so every batch has one shape and the blocks compile once.
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


@pytest.mark.parametrize("autocast", [False, True], ids=["32-true", "bf16-mixed"])
@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_a_lora_block_compiles_into_one_graph(tmp_path, dropout, autocast):
    # a graph break per adapted layer (each layer's dropout draw, once at p = 0 too) left torch.compile a graph per
    # layer and a forward recompiled per layer: on a GPU, compiled LoRA no faster than eager. The masks are drawn
    # before the block (draw_block_dropout, as compile_blocks_for_training does), in the graph they are inputs.
    # Under CPU autocast the frozen weights' kept bfloat16 copies broke it too (frozen_autocast_copy).
    save_tiny_hf_model("llama", tmp_path)
    model = apply_lora(load_model(tmp_path), LoRAConfig(r=4, dropout=dropout)).train()
    block = model.layers[1]
    x = torch.randn(2, 8, model.config.hidden_size, requires_grad=True)  # the gradient-carrying input of blocks 1+
    cos, signed_sin = model.rope(torch.arange(8), dtype=x.dtype)
    draw_block_dropout(block, x)
    assert all((layer.drawn is not None) == (dropout > 0) for layer in block.modules() if isinstance(layer, LoRALinear))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        explanation = torch._dynamo.explain(type(block).forward)(block, x, cos, signed_sin, None, None)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
