"""``examples/quickstart.ipynb``: a clean nbformat-4 file, and it runs top to bottom.

The run uses the notebook's quick mode (``EXO2EGO_NOTEBOOK_QUICK=1``: a tiny world, a few
steps per stage, two items per EgoBench task) in a Jupyter kernel started with *this*
interpreter (a ``python3`` kernelspec written to a temporary ``JUPYTER_PATH``), with the
working directory a temporary folder, so nothing is written into the repository.

The kernel sees one CPU device (the suite's 8 fake devices in ``XLA_FLAGS`` are dropped), as
on a laptop or a Colab CPU runtime, and shares the suite's persistent compilation cache.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"
TASKS = {
    "EgoSchema",
    "QAEgo4D",
    "EgoTaskQA",
    "Charades-Ego",
    "EPIC-KITCHENS-100 MIR",
    "EgoPlan-Bench (val)",
    "VLN-QA",
    "EgoMCQ",
}
QUICK_STEPS = 4  # the notebook's quick-mode optim.num_steps


def _cells_tagged(nb, tag: str) -> list:
    return [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]


def _stdout(cell) -> str:
    return "".join(
        o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout"
    )


def _kernelspec_dir(root: Path) -> Path:
    """A ``python3`` kernelspec that runs this interpreter (``root`` goes on JUPYTER_PATH)."""
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "Python 3 (test venv)", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    return root


def test_notebook_is_clean_nbformat4():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    for tag in ("install", "parameters", "chat"):
        assert len(_cells_tagged(nb, tag)) == 1, tag
    source = _cells_tagged(nb, "parameters")[0].source
    assert 'os.environ.get("EXO2EGO_NOTEBOOK_QUICK", "0") == "1"' in source


@pytest.mark.slow
def test_quickstart_notebook_runs_in_quick_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(_kernelspec_dir(tmp_path / "jupyter")))
    monkeypatch.setenv("EXO2EGO_NOTEBOOK_QUICK", "1")
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device, as a user's runtime
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    # The checkout under test, whatever else is installed (the install cell then skips pip).
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), *([path] if path else [])]))
    cache = os.environ.get("EXO2EGO_TEST_JAX_CACHE", "/tmp/exo2ego-jax-test-cache")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", cache)
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # ipykernel then picks the inline backend
    workdir = tmp_path / "cwd"
    workdir.mkdir()

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=1200,  # per cell
        startup_timeout=180,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]

    # The kernel ran this virtualenv's interpreter, on the checkout under test.
    backend = _stdout(_cells_tagged(nb, "backend")[0])
    assert f"(prefix {sys.prefix})" in backend, backend
    assert f"exo2ego_jax from {ROOT / 'exo2ego_jax'}" in backend, backend
    assert "backend 'cpu', 1 device(s)" in backend, backend
    assert "nothing to install" in _stdout(_cells_tagged(nb, "install")[0])

    run = workdir / "exo2ego_quickstart" / "quick"
    assert run.is_dir() and set(os.listdir(workdir)) == {"exo2ego_quickstart"}
    for stage in range(4):
        records = [
            json.loads(line)
            for line in (run / "runs" / f"stage{stage}" / "metrics.jsonl").read_text().splitlines()
        ]
        assert [r["step"] for r in records] == list(range(1, QUICK_STEPS + 1)), stage
        assert all(math.isfinite(r["loss"]) for r in records), (stage, records)
    plot = _cells_tagged(nb, "plot")[0]
    assert any("image/png" in o.get("data", {}) for o in plot.outputs)

    results = (run / "runs" / "eval" / "results.md").read_text()
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in results.splitlines()[2:]
        if line.startswith("|")
    ]
    assert {r[0] for r in rows} == TASKS | {"Average"}
    assert len({r[0] for r in rows if r[0] in TASKS}) == 8
    average = next(r for r in rows if r[0] == "Average")
    assert average[1] == "mean of 8 tasks" and math.isfinite(float(average[2]))
    shown = _cells_tagged(nb, "eval")[0].outputs
    assert any("| EgoSchema |" in o.get("data", {}).get("text/markdown", "") for o in shown)

    chat = _stdout(_cells_tagged(nb, "chat")[0])
    match = re.search(r"^answer: (.*)$", chat, re.M)
    assert match, chat
    assert match.group(1) not in ("''", '""'), chat
    assert chat.startswith("Q: ") and "\nA: " in chat


def test_install_cell_has_one_marked_url_and_the_text_matches_the_code():
    from exo2ego_jax.demo import runner

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert code.count("# <-- SET THIS") == 1 and 'REPO_URL = ""  # <-- SET THIS' in code
    assert "github.com/exo2ego-jax/exo2ego-jax" not in code  # no placeholder repository
    assert "uploaded_checkout()" in code  # the other way in, said in the text too
    assert "Set `REPO_URL`" in text and "uploaded" in text
    takes = re.findall(r"`runner\.WORLD_TAKES` \((\d+)\) takes", text)
    assert takes == [str(runner.WORLD_TAKES)], takes
