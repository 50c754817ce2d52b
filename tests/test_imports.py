"""One-way imports (STYLE.md §2): each module may import only the rdbt modules of the layers below it, and the modules
behind `--help`, `inspect`, `models`, `presets` and `lora-stack` never import torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "rdbt_cli"

ALLOWED = {
    "config": set(),
    "errors": set(),
    "discovery": {"config", "errors"},
    "sampling": {"errors"},
    "lora": {"errors", "config", "discovery"},
    "lora_stack": {"config", "errors", "discovery"},
    "text": {"config", "errors"},
    "settings": {"config", "errors"},
    "console": set(),
    "coercion": set(),
    "options": {"coercion", "completion", "config", "settings", "naming", "jobs", "preview", "errors"},
    "presets": {"config", "errors", "settings"},
    "metadata": {"config", "errors", "settings"},
    "engine": {"config", "discovery", "errors"},
    "images": {"errors"},
    "pipeline": {"config", "engine", "errors", "images", "sampling", "settings", "text", "lora"},
    "tiny": {"config", "engine", "text"},
    "wildcards": {"config", "errors"},
    "grid": {"config", "errors", "settings", "jobs", "metadata", "runner", "client"},
    "grid_cmd": {"config", "settings", "options", "grid", "metadata", "console", "client"},
    "lora_info": {"discovery"},
    "files_cmd": {"console", "errors", "options", "lora_info", "metadata", "discovery", "lora_stack", "config", "jobs"},
    "jobs": {"config", "errors", "settings", "presets", "lora_stack", "discovery", "text", "metadata", "tiny", "images",
             "wildcards", "lora_info"},
    "runner": {"config", "errors", "discovery", "metadata", "pipeline", "jobs"},
    "batch": {"config", "errors", "settings", "jobs", "metadata", "runner", "client"},
    "bench": {"config", "engine", "sampling", "pipeline", "tiny", "errors"},
    "completion": {"errors", "discovery", "presets"},
    "naming": {"errors", "settings"},
    "preview": {"errors"},
    "a1111": {"config", "errors", "metadata", "settings"},
    "client": {"config", "errors", "metadata", "settings", "jobs", "runner"},
    "server": {"config", "errors", "a1111", "client", "discovery", "jobs", "metadata", "settings", "runner", "sampling",
               "preview"},
    "serve_cmd": {"completion", "config", "errors", "settings", "options", "client", "server"},
}
TORCH_FREE = [
    "config", "errors", "discovery", "lora_stack", "text", "settings", "presets", "metadata", "jobs", "batch", "console",
    "cli", "images", "completion", "options", "a1111", "client", "serve_cmd", "tiny", "wildcards", "grid", "grid_cmd",
    "naming", "preview", "coercion",
    "lora_info", "files_cmd",
]


def _rdbt_imports(module: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse((PKG / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "rdbt_cli":
            found |= {a.name for a in node.names if a.name != "__version__"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rdbt_cli."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("rdbt_cli.")}
    return found


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_imports_go_one_way(module):
    extra = _rdbt_imports(module) - ALLOWED[module]
    assert not extra, f"rdbt_cli.{module} imports {sorted(extra)}, which sit above it"


def test_every_module_has_a_layer():
    modules = {p.stem for p in PKG.glob("*.py")} - {"__init__", "__main__", "cli"}
    assert modules <= set(ALLOWED), modules - set(ALLOWED)


def test_light_modules_do_not_import_torch():
    code = f"import sys\nfor m in {TORCH_FREE!r}: __import__('rdbt_cli.' + m)\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
