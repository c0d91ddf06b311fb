"""Imports point one way: config <- data, model, loss, qblocks <- attention <- forward <- support <- checkpoint, evaluate <- train <- cli;
mixers (torch only) <- forward, support.

report (files only) <- train, compare; data, model <- inspect_data; evaluate, model <- chat; train <- compare <- cli;
stats (numpy only) <- evaluate, answers, compare; data, stats <- answers <- train, cli;
config, train, evaluate, export <- api <- __init__ (the public API; heavy modules imported on first call)."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "orpo"

# module -> orpo modules it may import
ALLOWED = {
    "errors": set(),
    "config": {"errors", "config"},
    "data": {"config", "errors", "data"},
    "loss": set(),
    "qblocks": set(),
    "attention": {"qblocks"},
    "multimodal": {"errors"},
    "modelfiles": {"errors"},
    "model": {"errors", "config", "lora_targets", "modelfiles", "multimodal"},
    "lora_targets": set(),
    "lean": {"model"},
    "progress": set(),
    "router": {"errors", "model"},
    "mixers": set(),
    "forward": {"attention", "data", "errors", "loss", "mixers", "model", "multimodal"},
    "image_forward": {"data", "errors", "forward", "model", "multimodal", "support", "attention"},
    "miniature": {"attention", "model"},
    "support": {"attention", "data", "errors", "forward", "loss", "miniature", "mixers", "model", "multimodal"},
    "diskio": {"errors"},
    "runlock": {"errors"},
    "integrity": set(),
    "checkpoint": {"errors", "diskio", "integrity"},
    "optim": {"config", "errors"},
    "resume": {"checkpoint", "diskio", "errors", "integrity"},
    "evaluate": {"data", "forward", "loss", "model", "errors", "precision", "stats", "support"},
    "stats": set(),
    "precision": set(),
    "recompute": {"data"},
    "answers": {"data", "stats"},
    "train": {"answers", "checkpoint", "config", "data", "diskio", "errors", "evaluate", "export", "forward", "image_forward",
              "loss", "lean", "model", "multimodal", "optim", "precision", "progress", "recompute", "report", "resume", "router",
              "runlock", "support"},
    "export": {"config", "errors", "model", "modelfiles", "multimodal"},
    "cli": {"answers", "config", "errors", "train", "evaluate", "export", "report", "inspect_data", "chat", "compare",
            "multimodal"},
    # the report reads files only (stdlib + matplotlib); the inspector needs data and the tokenizer
    "report": {"errors", "config", "diskio"},
    "inspect_data": {"config", "data", "errors", "image_forward", "model"},
    "chat": {"errors", "evaluate", "model"},
    "compare": {"config", "data", "errors", "report", "stats", "train"},
    "__main__": {"cli"},
    "api": {"config", "train", "evaluate", "export"},
    "__init__": {"config", "api", "train"},
}


def orpo_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    pkg_parts = path.relative_to(SRC).parts[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(pkg_parts[: len(pkg_parts) - node.level + 1])
                target = base + (node.module.split(".") if node.module else [])
                if not target:
                    found.update(a.name for a in node.names)
                else:
                    found.add(target[0])
            elif node.module and node.module.startswith("orpo"):
                parts = node.module.split(".")
                found.add(parts[1] if len(parts) > 1 else "__init__")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("orpo."):
                    found.add(a.name.split(".")[1])
    return found


def test_import_direction():
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        module = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        allowed = ALLOWED[module] | {module}
        bad = orpo_imports(path) - allowed
        assert not bad, f"{rel} imports {bad}"


def test_loss_imports_only_torch():
    tree = ast.parse((SRC / "loss.py").read_text())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mods.add((node.module or "").split(".")[0])
    assert mods <= {"torch", "math", "dataclasses", "__future__"}, mods


def test_config_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, orpo.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_report_imports_no_torch():
    """The report runs beside a training job (orpo report OUT): stdlib, matplotlib and PyYAML only."""
    import subprocess
    import sys

    code = "import sys, orpo.report; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False False"
