"""`litllm cp`: copy a task script out of the package, to read, edit and run as your own.

A copied script imports only the installed `litllm` package, so `python my_lora.py --config lora.yaml`
runs it exactly as `litllm finetune lora --config lora.yaml` would, with your edits.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from litllm.errors import UserError
from litllm.files import atomic_file, refuse_to_overwrite

PACKAGE_DIR = Path(__file__).parent

# the name users type -> the script's file in the package
SCRIPTS = {
    "finetune/lora": "finetune/lora.py",
    "finetune/full": "finetune/full.py",
    "finetune/dpo": "finetune/dpo.py",
    "finetune/kto": "finetune/kto.py",
    "finetune/reward": "finetune/reward.py",
    "finetune/grpo": "finetune/grpo.py",
    "pretrain": "pretrain/pretrain.py",
    "evaluate": "evaluate.py",
    "serve": "serve.py",
    "generate": "generate.py",
}


def cp(script: str, dest: Path, overwrite: bool = False) -> Path:
    """Copy a task script to DEST (`litllm cp --list` lists them); then `python DEST --help` runs it.

    Args:
        script: finetune/lora, finetune/full, finetune/dpo, finetune/kto, finetune/reward, finetune/grpo, pretrain,
            evaluate, serve or generate.
        dest: the file (or existing directory) to copy it to.
        overwrite: replace DEST if it already exists.
    """
    if script not in SCRIPTS:
        raise UserError(f"unknown script {script!r}; `litllm cp --list` lists them: {', '.join(SCRIPTS)}")
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / Path(SCRIPTS[script]).name
    refuse_to_overwrite(dest, overwrite)
    with atomic_file(dest) as tmp:
        shutil.copyfile(PACKAGE_DIR / SCRIPTS[script], tmp)
    print(f"Copied {script} to {dest}; run it with: python {dest} --help")
    return dest


def list_scripts() -> None:
    for name, file in SCRIPTS.items():
        summary = (PACKAGE_DIR / file).read_text().split('"""')[1].strip().splitlines()[0]
        print(f"{name:<15} {summary}")
