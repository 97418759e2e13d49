"""The package's shape: a library below, task scripts above, no import circles; shared options said the same way
in every training script; names listed once."""
import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "litllm"

# what the task scripts stand on; none of it may import a task
LIBRARY = {"litllm", "litllm.errors", "litllm.config", "litllm.model", "litllm.rope", "litllm.checkpoint",
           "litllm.tokenizer", "litllm.lora", "litllm.lora_dropout", "litllm.quantize", "litllm.decode",
           "litllm.batching", "litllm.api", "litllm.reward", "litllm.rewards", "litllm.cli", "litllm.files",
           "litllm.memory",
           "litllm.data", "litllm.training"}
# the commands; they may import each other's helpers (convert.to_gguf uses convert.from_gguf's name tables)
TASKS = {"litllm.finetune", "litllm.pretrain", "litllm.generate", "litllm.evaluate", "litllm.serve",
         "litllm.convert", "litllm.tokenizer_tools", "litllm.cp", "litllm.download"}
# the `litllm` command above them all, which loads the task it runs by name
TOP = {"litllm.commands", "litllm.__main__"}

TRAINING_SCRIPTS = ["litllm.finetune.lora", "litllm.finetune.full", "litllm.finetune.dpo", "litllm.finetune.kto",
                    "litllm.finetune.reward", "litllm.finetune.grpo", "litllm.pretrain.pretrain"]
SHARED_OPTIONS = ["devices", "num_nodes", "strategy", "precision", "optimizer", "logger", "seed", "resume",
                  "overwrite"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The litllm modules `path` imports anywhere in it (inside functions too): `from a.b import c` counts a.b.c
    when that is a module, else a.b."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(paths)) for name, path in paths.items()}


def floor(module: str) -> str:
    for kind, roots in (("top", TOP), ("task", TASKS), ("library", LIBRARY)):
        if any(module == root or module.startswith(root + ".") for root in roots if root != "litllm"):
            return kind
    return "library" if module == "litllm" else "unclassified"


def test_every_module_is_library_task_or_the_command():
    assert {name: floor(name) for name in import_graph() if floor(name) == "unclassified"} == {}


def test_library_never_imports_a_task():
    wrong = {f"{module} -> {imported}" for module, imported_modules in import_graph().items()
             for imported in imported_modules if floor(module) == "library" and floor(imported) != "library"}
    assert wrong == set()


def test_no_import_cycles():
    graph = import_graph()
    cycles = []

    def visit(module, path):
        for imported in sorted(graph[module]):
            if imported in path:
                cycles.append(" -> ".join(path[path.index(imported):] + [imported]))
            elif imported not in done:
                visit(imported, path + [imported])
        done.add(module)

    done: set[str] = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert cycles == []


def test_only_the_model_touches_its_kv_cache_tensors():
    offenders = [str(path) for path in PACKAGE.rglob("*.py") if path.name != "model.py"
                 and re.search(r"kv_cache\.(k|v)\b", path.read_text())]
    assert offenders == []


def docstring_args(function) -> dict[str, str]:
    """{name: help} from the Args section of a Google-style docstring, continuation lines joined."""
    doc = inspect.getdoc(function)
    section = doc[doc.index("Args:"):].splitlines()[1:]
    helps, name = {}, None
    for line in section:
        if match := re.match(r"    (\w+): (.*)", line):
            name = match[1]
            helps[name] = match[2]
        elif name and line.startswith("        "):
            helps[name] += " " + line.strip()
    return helps


def test_training_scripts_share_options_with_the_same_help_and_defaults():
    import importlib

    setups = {name: importlib.import_module(name).setup for name in TRAINING_SCRIPTS}
    helps = {name: docstring_args(setup) for name, setup in setups.items()}
    signatures = {name: inspect.signature(setup).parameters for name, setup in setups.items()}
    for option in SHARED_OPTIONS:
        assert len({helps[name][option] for name in setups}) == 1, option
        assert len({(str(signatures[name][option].annotation), signatures[name][option].default)
                    for name in setups}) == 1, option


def test_every_documented_quantize_mode_is_accepted():
    from litllm.commands import main
    from litllm.quantize import QUANTIZE_MODES

    documented = set()
    for doc in [PACKAGE.parent / "README.md", *sorted((PACKAGE.parent / "tutorials").glob("*.md"))]:
        documented |= set(re.findall(r"\bbnb\.[a-z0-9]+(?:-dq)?\b", doc.read_text()))
    assert documented and documented <= set(QUANTIZE_MODES)
    for mode in QUANTIZE_MODES:
        with pytest.raises(SystemExit) as exit:
            main(["finetune", "lora", "ckpt", "--quantize", mode, "--print_config"])
        assert exit.value.code in (0, None), mode


def test_help_imports_neither_lm_eval_nor_the_web_server():
    probe = ("import sys; from litllm.commands import main\n"
             "for args in (['--help'], ['generate', '--help']):\n"
             "    try: main(args)\n"
             "    except SystemExit: pass\n"
             "heavy = [m for m in ('lm_eval', 'fastapi', 'uvicorn', 'lightning_fabric') if m in sys.modules]\n"
             "print('heavy', heavy, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "heavy []" in result.stderr
