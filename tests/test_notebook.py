"""examples/orpo_tutorial.ipynb runs top to bottom in a real Jupyter kernel, offline: the tutorial's
steps (data, config, train, evaluate, generate, export) on the embedded SmolLM2 model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import requires_smollm2

pytestmark = [pytest.mark.integration, requires_smollm2]

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "orpo_tutorial.ipynb"
MUST_RUN = os.environ.get("ORPO_REQUIRE_INTEGRATION") == "1"


def _need(module: str):
    if MUST_RUN:
        return __import__(module)
    return pytest.importorskip(module, reason=f"{module} not installed (pip install 'orpo[test]')")


def test_the_committed_notebook_has_no_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c.get("outputs") and c.get("execution_count") is None for c in code)


def test_the_tutorial_notebook_runs_in_a_kernel(tmp_path):
    nbformat, nbclient = _need("nbformat"), _need("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # the kernel inherits this environment (HF_HUB_OFFLINE=1, PYTHONPATH) and runs in tmp_path
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    # TRL's names were read, each with its line
    assert "reading TRL's evaluation_strategy as eval_strategy" in text
    assert "reading TRL's per_device_eval_batch_size as eval_batch_size" in text
    run = tmp_path / "runs" / "tutorial" / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 2, 4]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert "orpo.evaluate: eval_loss" in text and "the run's own: eval_loss" in text
    assert text.count(" -> ") == 3  # three generated answers
    assert list((tmp_path / "runs" / "tutorial" / "export").glob("*.gguf"))
    assert (tmp_path / "runs" / "tutorial" / "export" / "README.md").is_file()
