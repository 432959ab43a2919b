"""bench/accelerator.py at its smallest size on CPU: every row of its tables is there."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load():
    sys.path.insert(0, str(BENCH))  # it imports bench/results.py as its script would
    try:
        spec = importlib.util.spec_from_file_location("bench_accelerator", BENCH / "accelerator.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up by name
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


@pytest.mark.slow
def test_accelerator_bench_tables_have_every_row(capsys):
    acc = _load()
    results = (BENCH / "RESULTS.md").read_text()
    acc.main(["--size", "test", "--steps", "1", "--in-process", "--no-write"])
    out = capsys.readouterr().out
    assert (BENCH / "RESULTS.md").read_text() == results  # --no-write wrote nothing

    table = out[out.index("## Accelerator benchmark, size test") :]
    assert "| cpu | n/a |" in table  # device row: CPU has no nominal peak
    # Attention alone: every implementation named, the CPU ones measured.
    for impl in ("xla", "reference"):
        row = next(r for r in table.splitlines() if r.startswith(f"| {impl} | {impl} |"))
        assert "—" not in row
    for impl in ("cudnn", "splash"):
        assert f"| {impl} | n/a:" in table
    # Train steps: stage 3 and stage 2 with each CPU kernel, nothing failed.
    for stage in (3, 2):
        for impl in ("xla", "reference"):
            row = next(r for r in table.splitlines() if r.startswith(f"| {stage} | {impl} ("))
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert len(cells) == 12, row
            compile_s, step_s, counted, loss = cells[3], cells[4], cells[5], cells[10]
            assert float(compile_s) > 0 and float(step_s.split()[0]) > 0
            assert float(counted) > 0  # model FLOPs counted with unrolled layers
            assert 0 < float(loss) < 20
    assert "error" not in table
    assert "losses agree across implementations" in table
