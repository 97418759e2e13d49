"""Mistakes a user can make end in one line naming what to fix, exit code 2, and nothing of theirs is lost."""
import errno
import json
import shutil
from pathlib import Path

import pytest

from litllm.commands import main
from litllm.errors import UserError
from litllm.files import atomic_dir

DATA = Path(__file__).resolve().parents[1] / "data"


def one_line_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit:
        main([str(arg) for arg in args])
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def broken_checkpoints(tiny_chat_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Copies of the tiny checkpoint, each with one thing wrong."""
    root = tmp_path_factory.mktemp("broken")

    def broken(name: str, edit) -> Path:
        directory = root / name
        shutil.copytree(tiny_chat_model_dir, directory)
        edit(directory)
        return directory

    def config(**changes):
        def edit(directory: Path) -> None:
            values = json.loads((directory / "config.json").read_text())
            (directory / "config.json").write_text(json.dumps({**values, **changes}))
        return edit

    def template(text: str):
        def edit(directory: Path) -> None:
            values = json.loads((directory / "tokenizer_config.json").read_text())
            (directory / "tokenizer_config.json").write_text(json.dumps({**values, "chat_template": text}))
            (directory / "chat_template.jinja").unlink(missing_ok=True)
        return edit

    def index(shard: str):
        def edit(directory: Path) -> None:
            (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shard}}))
        return edit

    return {
        "sizes": broken("sizes", config(hidden_size=128)),
        "no heads": broken("no-heads", config(num_attention_heads=0)),
        "list": broken("list", lambda d: (d / "tokenizer_config.json").write_text("[1, 2]")),
        "template": broken("template", template("{{ (messages | length) / 0 }}")),
        "index": broken("index", index("../../elsewhere.safetensors")),
    }


MISTAKES = {
    "empty prompt": (["generate", "{tiny}", "--prompt", ""], "the prompt is empty"),
    "top_k 0": (["generate", "{tiny}", "--temperature", "1", "--top_k", "0"], "top_k must be at least 1"),
    "top_p 0": (["generate", "{tiny}", "--temperature", "1", "--top_p", "0"], "top_p must be in (0, 1]"),
    "unknown device": (["generate", "{tiny}", "--device", "bogus"], "'bogus' is not a torch device"),
    "missing gpu": (["generate", "{tiny}", "--device", "cuda:7"], "cuda:7"),
    "config sizes": (["generate", "{sizes}"], "the config does not belong to these weights"),
    "zero heads": (["generate", "{no heads}"], "n_heads must be a positive integer"),
    "tokenizer_config list": (["generate", "{list}"], "expected a JSON object, found a list"),
    "template raises": (["chat", "{template}"], "the chat template failed on these messages: ZeroDivisionError"),
    "index outside": (["generate", "{index}"], "is not a file inside"),
    "bad repo id": (["download", "bad//repo", "--out_dir", "{tmp}/m"], "is not a hub repository name"),
    "log_interval 0": (["finetune", "lora", "{tiny}", "--train.log_interval", "0"], "--train.log_interval must be"),
    "micro_batch_size 0": (["finetune", "lora", "{tiny}", "--train.micro_batch_size", "0"], "micro_batch_size"),
    "lr 0": (["finetune", "lora", "{tiny}", "--train.lr", "0"], "--train.lr must be above 0"),
    "unknown key": (["finetune", "lora", "{tiny}", "--lora.rank", "4"], "--lora.r"),
    "qlora fsdp": (["finetune", "lora", "{tiny}", "--quantize", "bnb.nf4", "--devices", "2", "--strategy", "fsdp",
                    "--out_dir", "{tmp}/qlora"], "--quantize bnb.nf4 does not work with --strategy fsdp"),
    "out_dir a file": (["finetune", "lora", "{tiny}", "--data", "JSON", "--data.json_path", DATA / "alpaca_demo.json",
                        "--out_dir", DATA / "alpaca_demo.json"], "is a file, not a directory"),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_mistake_is_one_line_with_exit_2(mistake, tiny_chat_model_dir, broken_checkpoints, tmp_path, capsys,
                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, expected = MISTAKES[mistake]
    places = {"tiny": tiny_chat_model_dir, "tmp": tmp_path, **broken_checkpoints}
    if mistake == "template raises":
        monkeypatch.setattr("sys.stdin", __import__("io").StringIO("hello\n"))
    error = one_line_error([str(arg).format(**places) for arg in args], capsys)
    assert expected in error
    assert not (tmp_path / "qlora").exists()  # refused before anything started


def test_a_bad_data_row_is_named_by_file_and_line(tiny_chat_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    error = one_line_error(["finetune", "lora", tiny_chat_model_dir, "--data", "JSON", "--data.json_path", bad,
                            "--out_dir", tmp_path / "out"], capsys)
    assert f"{bad}:2: missing key 'output'" in error


@pytest.mark.parametrize("out_dir", ["checkpoint", ".", "home"])
def test_overwrite_never_deletes_what_litllm_did_not_write(out_dir, tiny_chat_model_dir, tmp_path, capsys,
                                                            monkeypatch):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_chat_model_dir, checkpoint)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "draft.txt").write_text("mine too")
    monkeypatch.chdir(tmp_path / "work")
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    target = {"checkpoint": checkpoint, ".": ".", "home": tmp_path / "home"}[out_dir]
    one_line_error(["finetune", "lora", checkpoint, "--data", "JSON", "--data.json_path", DATA / "alpaca_demo.json",
                    "--out_dir", target, "--overwrite", "true"], capsys)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before


def test_overwrite_of_a_run_keeps_the_users_files_there(tiny_chat_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "step-000004").mkdir(parents=True)
    (run / "notes.txt").write_text("mine")
    error = one_line_error(["finetune", "lora", tiny_chat_model_dir, "--data", "JSON", "--data.json_path",
                            DATA / "alpaca_demo.json", "--out_dir", run, "--overwrite", "true"], capsys)
    assert "notes.txt" in error
    assert (run / "notes.txt").read_text() == "mine" and (run / "step-000004").is_dir()


def test_a_full_disk_is_a_user_error_and_the_old_directory_stays(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights").write_text("old")
    with pytest.raises(UserError, match="no space left on the device"):
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "weights").write_text("new, half written")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert (tmp_path / "model" / "weights").read_text() == "old"


@pytest.mark.parametrize("target_modules, message", [("(q_proj", "is not a valid regex"),
                                                     ("q" * 5000, "5,000-character pattern")])
def test_adapter_target_patterns_are_checked(target_modules, message, tiny_chat_model_dir, tmp_path):
    from litllm.checkpoint import load_model
    from litllm.lora import LoRAConfig, apply_lora, load_adapter, save_adapter

    save_adapter(apply_lora(load_model(tiny_chat_model_dir), LoRAConfig(r=2)), LoRAConfig(r=2), tmp_path,
                 base_checkpoint=tiny_chat_model_dir)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": target_modules}))
    with pytest.raises(UserError, match=message):
        load_adapter(load_model(tiny_chat_model_dir), tmp_path)


def test_overwrite_of_a_model_dir_keeps_the_users_files_there(tiny_chat_model_dir, tmp_path, capsys):
    from litllm.checkpoint import load_model
    from litllm.lora import LoRAConfig, apply_lora, save_adapter

    adapter = tmp_path / "adapter"
    save_adapter(apply_lora(load_model(tiny_chat_model_dir), LoRAConfig(r=2)), LoRAConfig(r=2), adapter,
                 base_checkpoint=tiny_chat_model_dir)
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    (merged / "thesis.tex").write_text("mine")
    error = one_line_error(["convert", "merge_lora", adapter, "--out_dir", merged, "--overwrite", "true"], capsys)
    assert "thesis.tex" in error and (merged / "thesis.tex").read_text() == "mine"
    one_line_error(["convert", "merge_lora", adapter, "--out_dir", adapter, "--overwrite", "true"], capsys)
    assert (adapter / "adapter_model.safetensors").is_file()
