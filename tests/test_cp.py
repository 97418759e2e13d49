"""`litllm cp`: a copied task script runs on its own, and editing the copy changes what it trains."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from litllm.cp import SCRIPTS, cp
from litllm.data import JSON, Preference, Prompts, TextCorpus
from litllm.finetune.grpo import GRPOArgs
from litllm.lora import LoRAConfig
from litllm.training.args import TrainArgs

ROOT = Path(__file__).parent.parent
DATA = ROOT / "data"


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


def test_copied_lora_script_trains_outside_the_repository(tiny_chat_model_dir, tmp_path):
    dest = tmp_path / "my_lora.py"
    cp("finetune/lora", dest)
    result = run([sys.executable, str(dest), str(tiny_chat_model_dir), "--data", "JSON",
                  "--data.json_path", str(DATA / "alpaca_demo.json"), "--out_dir", "out", "--train.max_steps", "1",
                  "--train.global_batch_size", "2", "--train.micro_batch_size", "2", "--train.max_seq_length", "64",
                  "--train.eval_max_batches", "1"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "final" / "adapter_model.safetensors").is_file()


# the objective's last line in each script, and that line with the loss multiplied by 0
LOSS_LINES = {
    "finetune/lora": '    return cross_entropy_sum(model.lm_head, hidden, batch["labels"], chunk_size)\n',
    "finetune/full": '    return cross_entropy_sum(model.lm_head, hidden, batch["labels"], chunk_size)\n',
    "pretrain": '    return cross_entropy_sum(model.lm_head, hidden, batch["labels"], chunk_size)\n',
    "finetune/dpo": ("    return losses.sum(), reward_metrics(chosen_rewards, rejected_rewards, policy_chosen, "
                     "policy_rejected)\n"),
    "finetune/kto": "    return losses.sum(), kto_metrics(rewards, policy, kl, desirable)\n",
    "finetune/reward": "    return losses.sum(), {\n",
    "finetune/grpo": '    return loss, {**metrics, "entropy": entropy.sum(), "count/tokens": torch.tensor(float(len(logps)))}\n',
}
# what each training step logs: the copy adds a metric of its own
LOGGED_LINE = '        metrics = {**units.mean({"loss": loss_sum}), "lr": scheduler.get_last_lr()[0]}\n'
LOGGED_LINES = {**dict.fromkeys(["finetune/lora", "finetune/full", "pretrain"], LOGGED_LINE),
                **dict.fromkeys(["finetune/dpo", "finetune/reward"], LOGGED_LINE.replace('{"loss": loss_sum}', "sums")),
                "finetune/kto": LOGGED_LINE.replace('units.mean({"loss": loss_sum})', "kind_means(units.mean(sums))"),
                "finetune/grpo": ('            metrics |= {**rollout_log, "timing/train": time.perf_counter() - started, '
                                  '"lr": scheduler.get_last_lr()[0]}\n')}


def copy_and_import(script: str, dest: Path, edits: dict[str, str]):
    cp(script, dest)
    text = dest.read_text()
    for old, new in edits.items():
        assert text.count(old) == 1, (script, old)
        text = text.replace(old, new)
    dest.write_text(text)
    spec = importlib.util.spec_from_file_location(f"copied_{abs(hash(dest))}", dest)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an imported script is: its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def train_two_steps(module, script: str, model_dir: Path, out_dir: Path) -> None:
    train = TrainArgs(global_batch_size=2, micro_batch_size=2, max_steps=2, max_seq_length=64, lr=1e-2,
                      warmup_steps=0, weight_decay=0.0, eval_interval=None, eval_max_batches=1)
    if script == "pretrain":
        text = out_dir.parent / "corpus.txt"
        text.write_text((DATA / "tiny_shakespeare.txt").read_text()[:20000])
        corpus = TextCorpus(paths=text, cache_dir=out_dir.parent / "cache")
        module.setup(initial_checkpoint=model_dir, data=corpus, out_dir=out_dir, train=train)
    elif script == "finetune/grpo":  # a reward that differs between completions: advantages that are not 0
        (out_dir.parent / "length.py").write_text("def length(completions, **kwargs):\n"
                                                  "    return [float(len(c)) for c in completions]\n")
        module.setup(model_dir, data=Prompts(json_path=DATA / "arithmetic_demo.jsonl"), out_dir=out_dir, train=train,
                     reward=f"{out_dir.parent / 'length.py'}:length", lora=LoRAConfig(dropout=0.0),
                     grpo=GRPOArgs(num_generations=2, max_completion_length=4))
    elif script in ("finetune/dpo", "finetune/kto", "finetune/reward"):
        module.setup(model_dir, data=Preference(json_path=DATA / "ko_preference_demo.jsonl"), out_dir=out_dir,
                     train=train, lora=LoRAConfig(dropout=0.0))
    else:
        extra = {"lora": LoRAConfig(dropout=0.0)} if script == "finetune/lora" else {}
        module.setup(model_dir, data=JSON(json_path=DATA / "alpaca_demo.json"), out_dir=out_dir, train=train, **extra)


def trained_weights(final: Path) -> dict[str, torch.Tensor]:
    adapter = final / "adapter_model.safetensors"
    return load_file(adapter if adapter.is_file() else final / "model.safetensors")


def weights_moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    if not before:  # a fresh adapter: its B factors start at zero
        return any(bool(tensor.any()) for name, tensor in after.items() if "lora_B" in name)
    return any(not torch.equal(before[name], after[name]) for name in before)


@pytest.mark.parametrize("script", list(LOSS_LINES))
def test_editing_the_copied_loss_changes_what_trains(script, tiny_chat_model_dir, tmp_path):
    """The copy holds the objective and the step: its loss times 0 leaves every weight as it was (and the metric
    the copy adds is logged), while the unedited copy moves them."""
    fresh_adapter = script in ("finetune/lora", "finetune/dpo", "finetune/kto", "finetune/reward", "finetune/grpo")
    starting = {} if fresh_adapter else load_file(tiny_chat_model_dir / "model.safetensors")
    zero_loss = {LOSS_LINES[script]: LOSS_LINES[script].replace("return ", "return 0 * ", 1),
                 LOGGED_LINES[script]: LOGGED_LINES[script].replace("]}", '], "my_metric": 42.0}')}
    edited = copy_and_import(script, tmp_path / "edited_copy.py", zero_loss)
    train_two_steps(edited, script, tiny_chat_model_dir, tmp_path / "edited")
    assert not weights_moved(starting, trained_weights(tmp_path / "edited" / "final"))
    metrics = (tmp_path / "edited" / "logs" / "version_0" / "metrics.csv").read_text()
    assert "my_metric" in metrics.splitlines()[0]

    unedited = copy_and_import(script, tmp_path / "unedited_copy.py", {})
    train_two_steps(unedited, script, tiny_chat_model_dir, tmp_path / "unedited")
    assert weights_moved(starting, trained_weights(tmp_path / "unedited" / "final"))
