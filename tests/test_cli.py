"""The `litllm` command as a user runs it: real processes, exit codes, one-line errors."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def litllm(*args, input=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "litllm", *map(str, args)], capture_output=True, text=True,
                          input=input, cwd=cwd, timeout=600)


def assert_one_line_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_help_lists_every_command_and_an_unknown_one_is_a_one_line_error():
    from litllm.commands import COMMANDS

    result = litllm("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert f"\n  {command} " in result.stdout
    assert "from_gguf" in litllm("convert", "--help").stdout
    assert_one_line_user_error(litllm("finetune", "lorax"), "unknown command 'lorax'", "full, lora, dpo")


def test_missing_checkpoint_dir(tmp_path):
    assert_one_line_user_error(litllm("generate", tmp_path / "nope", "--prompt", "hi"), "nope", "litllm download")


def test_bad_config_json(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama",\n "vocab_size": }')
    assert_one_line_user_error(litllm("generate", tmp_path, "--prompt", "hi"), "config.json:2", "invalid JSON")


def test_unknown_option_names_the_valid_ones(tmp_path):
    result = litllm("generate", tmp_path, "--promt", "hi")
    assert_one_line_user_error(result, "--promt", "--prompt", "--max_new_tokens")


def test_unknown_key_in_a_config_file_names_the_valid_ones(tmp_path):
    config = tmp_path / "generate.yaml"
    config.write_text("prompt: hi\ntemprature: 0.5\n")
    assert_one_line_user_error(litllm("generate", tmp_path, "--config", config), "temprature", "--temperature")


def test_print_config_round_trips_through_config(tiny_chat_model_dir, tmp_path, capsys):
    from litllm.commands import main

    args = ["generate", str(tiny_chat_model_dir), "--prompt", "The capital of France is", "--max_new_tokens", "6"]
    with pytest.raises(SystemExit) as printed:
        main([*args, "--print_config"])
    assert not printed.value.code
    config = capsys.readouterr().out
    assert "max_new_tokens: 6" in config
    (tmp_path / "generate.yaml").write_text(config)
    main(["generate", "--config", str(tmp_path / "generate.yaml")])
    from_config = capsys.readouterr().out
    main(args)
    assert from_config == capsys.readouterr().out and from_config.strip()


def test_prompt_longer_than_the_context(tiny_chat_model_dir, tmp_path):
    small = tmp_path / "small-context"
    shutil.copytree(tiny_chat_model_dir, small)
    config = json.loads((small / "config.json").read_text())
    config["max_position_embeddings"] = 16
    (small / "config.json").write_text(json.dumps(config))
    result = litllm("generate", small, "--prompt", "one two three four five six seven eight nine ten " * 3)
    assert_one_line_user_error(result, "context is 16", "shorten the prompt")


def test_chat_reads_turns_until_exit(smollm2_dir):
    result = litllm("chat", smollm2_dir, "--max_new_tokens", "24",
                    input="What is the capital of France?\n/exit\nnever read\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_download_offline_fails_in_one_line(tmp_path):
    result = litllm("download", "HuggingFaceTB/SmolLM2-135M-Instruct", "--out_dir", tmp_path / "m", cwd=tmp_path)
    assert_one_line_user_error(result, "could not download", "from_gguf")


def test_from_gguf_refuses_to_overwrite(smollm2_gguf, smollm2_dir):
    result = litllm("convert", "from_gguf", smollm2_gguf, "--out_dir", smollm2_dir)
    assert_one_line_user_error(result, str(smollm2_dir), "--overwrite true")


@pytest.mark.parametrize("config", sorted((Path(__file__).parents[1] / "config_hub" / "finetune").glob("*/*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_finetune_config_parses(config, capsys):
    from litllm.commands import main

    method = config.stem if config.stem in ("full", "dpo", "reward", "kto", "grpo") else "lora"  # (q)lora.yaml: lora
    with pytest.raises(SystemExit) as exit:
        main(["finetune", method, "--config", str(config), "--print_config"])
    printed = capsys.readouterr()
    assert exit.value.code in (0, None), printed.err
    assert "checkpoint_dir: checkpoints/" in printed.out


def test_a_list_option_given_twice_collects_both_and_any_other_keeps_the_last(capsys):
    from litllm.commands import main

    with pytest.raises(SystemExit) as exit:
        main(["finetune", "grpo", "ckpt", "--reward", "accuracy", "--reward=rm/final", "--train.lr", "1e-3",
              "--train.lr", "2e-3", "--print_config"])
    assert exit.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "reward:\n- accuracy\n- rm/final\n" in printed and "lr: 0.002\n" in printed
    with pytest.raises(SystemExit) as exit:
        main(["generate", "ckpt", "--stop", "a", "--stop", "b", "--max_new_tokens", "8", "--max_new_tokens", "9",
              "--print_config"])
    printed = capsys.readouterr().out
    assert "stop:\n- a\n- b\n" in printed and "max_new_tokens: 9\n" in printed
