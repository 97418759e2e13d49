"""tutorials/korean-pipeline.md, run as written: every shell block in order, in one bash, on the real SmolLM2.

Each step consumes the previous step's output; afterwards every output must exist and load in the tool that
consumes it (transformers for the merged model, gguf's reader for the export, litllm for the rest).
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
TUTORIAL = ROOT / "tutorials" / "korean-pipeline.md"


@pytest.mark.slow
def test_korean_pipeline_tutorial_runs_as_written(smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import gguf
    from litllm.checkpoint import load_model
    from litllm.tokenizer import Tokenizer

    # a working copy of the repository's layout: the tutorial names data/, config_hub/ and checkpoints/
    for name in ("data", "config_hub"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "checkpoints" / "HuggingFaceTB").mkdir(parents=True)
    (tmp_path / "checkpoints" / "HuggingFaceTB" / "SmolLM2-135M-Instruct").symlink_to(smollm2_dir)

    blocks = re.findall(r"```bash\n(.*?)```", TUTORIAL.read_text(), flags=re.DOTALL)
    script = "set -euo pipefail\n" + "\n".join(blocks)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    out = tmp_path / "out" / "ko"
    extended = Tokenizer(out / "extended")
    assert extended.vocab_size > Tokenizer(smollm2_dir).vocab_size
    assert load_model(out / "cpt" / "final").config.vocab_size == extended.vocab_size
    for stage in ("sft", "dpo"):
        assert (out / stage / "final" / "adapter_model.safetensors").is_file()
    results = list((out / "eval").rglob("results*.json"))
    assert results and "ko_chatbot_mc" in json.loads(results[0].read_text())["results"]
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert merged.config.vocab_size == extended.vocab_size
    assert AutoTokenizer.from_pretrained(out / "merged")("오늘")["input_ids"] == extended.encode("오늘")
    reader = gguf.GGUFReader(out / "smollm2-ko-q8_0.gguf")
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == extended.vocab_size
    completion = json.loads(result.stdout[result.stdout.index('{"id"'):].splitlines()[0])
    assert completion["object"] == "chat.completion" and completion["choices"][0]["message"]["content"]
