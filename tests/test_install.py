"""What the install promises is true: floors that match what the code calls and what is
installed, and a base install (``make demo``) that needs no test-only package."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
CODE = [p for d in ("exo2ego_jax", "input_pipeline", "configs") for p in (ROOT / d).rglob("*.py")]


def _floor(name: str, requirements: list[str]) -> Version:
    for r in map(Requirement, requirements):
        if r.name == name:
            return min(Version(s.version) for s in r.specifier if s.operator == ">=")
    raise AssertionError(f"{name} has no floor")


def _code_calls(pattern: str) -> bool:
    return any(re.search(pattern, p.read_text()) for p in CODE)


def test_floors_cover_what_the_code_calls():
    deps = PROJECT["dependencies"]
    # jax.set_mesh appeared in JAX 0.7.1, which needs Python 3.11.
    assert _code_calls(r"\bjax\.set_mesh\(")
    assert _floor("jax", deps) >= Version("0.7.1")
    assert PROJECT["requires-python"] == ">=3.11"
    for extra in ("gpu", "tpu"):
        assert _floor("jax", PROJECT["optional-dependencies"][extra]) >= Version("0.7.1")


def test_installed_versions_meet_every_floor():
    for req in map(Requirement, PROJECT["dependencies"]):
        installed = Version(importlib.metadata.version(req.name))
        assert req.specifier.contains(installed, prereleases=True), (req, installed)


def test_base_install_needs_no_test_only_package():
    """Every module of the package imports with the dev extra hidden (``make demo``
    installs the base dependencies only)."""
    dev_only = sorted(
        {Requirement(r).name.replace("-", "_") for r in PROJECT["optional-dependencies"]["dev"]}
        | {"sklearn", "peft"}
    )
    code = f"""
import importlib, importlib.machinery, pkgutil, sys
BLOCKED = {dev_only!r}
class Hidden(importlib.machinery.PathFinder):  # as if the dev extra were not installed
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)
sys.meta_path = [Hidden if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
import exo2ego_jax, input_pipeline, configs
for pkg in (exo2ego_jax, input_pipeline, configs):
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):
        if m.name.startswith('exo2ego_jax.web') or m.name.endswith('__main__'):
            continue  # the optional web extra
        importlib.import_module(m.name)
import main
print('ok')
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_makefile_installs_the_demo_without_the_dev_extra():
    make = (ROOT / "Makefile").read_text()
    demo_install = re.search(r"\.demo-stamp:.*?\n((?:\t.*\n)+)", make).group(1)
    assert "-e '.$(EXTRA)'" in demo_install and "dev" not in demo_install
    assert re.search(r"\.test-stamp:.*?\n(?:\t.*\n)*\t\$\(PIP\) -e '\.\[dev,web\]'", make)
