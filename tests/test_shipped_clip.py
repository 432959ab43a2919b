"""The shipped stand-in CLIP: its bytes are what the documented pretraining command makes
(checked at the manifest's small size), the files match the manifest, the demo copies it only
when it is what pretraining would make, and a damaged copy is refused."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest

from configs import demo as demo_configs
from exo2ego_jax import config_lib
from exo2ego_jax.demo import runner, shipped_clip


def _demo_tower(tmp_path):
    model = demo_configs.stage_config(0, tmp_path, tmp_path).model
    return config_lib.build_model_config(model).clip


SHIPPED_VIEWS = [shipped_clip.DEFAULT_VIEWS, shipped_clip.EXO_VIEWS]


@pytest.mark.parametrize("views", SHIPPED_VIEWS, ids=["-".join(v) for v in SHIPPED_VIEWS])
def test_small_run_of_the_command_reproduces_its_record(tmp_path, views):
    """The small-size command as a user runs it: its losses on any machine (to 0.01), its
    bytes on the machine that recorded them (XLA:CPU compiles for the host CPU)."""
    check = shipped_clip.manifest(shipped_clip.assets_for(views))["small_check"]
    # Its own process, without the suite's 8 fake devices and matmul precision (either
    # changes XLA:CPU's programs, so the bytes).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = tmp_path / "tower"
    args = shipped_clip.command_args(views, small=True)
    argv = ["-m", "exo2ego_jax.demo.pretrain_clip", "--out", str(out), *args]
    proc = subprocess.run([sys.executable, *argv], env=env, check=True, capture_output=True)
    assert check["command"].endswith(" ".join(args))
    assert shipped_clip.parse_losses(proc.stdout.decode()) == pytest.approx(check["loss"], abs=0.01)
    got = {name: shipped_clip.sha256(out / name) for name in shipped_clip.FILES}
    assert got["config.json"] == check["sha256"]["config.json"]
    if not shipped_clip.machine_differences(check["machine"]):
        assert got == check["sha256"]


def test_machine_differences_name_what_changes_the_bytes():
    here = shipped_clip.this_machine()
    assert set(here) == {"jax", "cpu_threads", "cpu"}
    assert shipped_clip.machine_differences(here) == []
    other_cpu = {**here, "cpu": "Some CPU [avx]"}
    assert shipped_clip.machine_differences(other_cpu) == [f"cpu Some CPU [avx] here {here['cpu']}"]
    # A record without the CPU (the towers' built_with before it was recorded) is not this one.
    old = {"jax": here["jax"], "cpu_threads": here["cpu_threads"]}
    assert shipped_clip.machine_differences(old) == [f"cpu unrecorded here {here['cpu']}"]


def test_shipped_files_match_their_manifest_and_the_demo_tower(tmp_path):
    info = shipped_clip.manifest()
    for name in shipped_clip.FILES:
        assert shipped_clip.sha256(shipped_clip.ASSET_DIR / name) == info["sha256"][name]
    assert info["command"] == shipped_clip.COMMAND  # the command's defaults, nothing else
    tower = _demo_tower(tmp_path)
    assert runner.clip_phase(tower, pretrain_clip=False) == runner.SHIPPED_CLIP
    # Anything but exactly the command's run pretrains.
    assert runner.clip_phase(tower, pretrain_clip=True) == "CLIP pretraining"
    assert runner.clip_phase(tower, False, seed=1) == "CLIP pretraining"
    assert runner.clip_phase(tower, False, clip_steps=20) == "CLIP pretraining"
    other = dataclasses.replace(tower, num_layers=tower.num_layers + 1)
    assert runner.clip_phase(other, pretrain_clip=False) == "CLIP pretraining"


def test_the_exo_only_tower_is_shipped_apart_and_chosen_by_its_views(tmp_path):
    """The study's tower (corpus of exo views only) has its own files and manifest, made by
    the same command with ``--views exo``, and is what the runner copies for those views."""
    exo = shipped_clip.assets_for(shipped_clip.EXO_VIEWS)
    assert exo != shipped_clip.ASSET_DIR
    info = shipped_clip.manifest(exo)
    assert info["command"] == shipped_clip.COMMAND + " --views exo"
    for name in shipped_clip.FILES:
        assert shipped_clip.sha256(exo / name) == info["sha256"][name]
    demo_sha = shipped_clip.manifest()["sha256"]["model.safetensors"]
    assert info["sha256"]["model.safetensors"] != demo_sha  # another tower
    tower = _demo_tower(tmp_path)
    assert runner.clip_phase(tower, False, views=("exo",)) == runner.SHIPPED_CLIP
    assert runner.clip_phase(tower, False, views=("exo",), clip_steps=20) == "CLIP pretraining"
    with pytest.raises(ValueError, match="no shipped CLIP tower"):
        shipped_clip.assets_for(("ego",))
    assert runner.clip_phase(tower, False, views=("ego",)) == "CLIP pretraining"
    assert shipped_clip.command_args(("exo",)) == ("--views", "exo")
    assert shipped_clip.command_args(("exo", "ego")) == ()  # the default corpus, any order


def test_install_copies_and_refuses_a_damaged_asset(tmp_path):
    out = tmp_path / "prepared" / "clip"
    shipped_clip.install(out)
    for name in shipped_clip.FILES:
        assert (out / name).read_bytes() == (shipped_clip.ASSET_DIR / name).read_bytes()

    damaged = tmp_path / "assets"
    shutil.copytree(shipped_clip.ASSET_DIR, damaged)
    blob = bytearray((damaged / "model.safetensors").read_bytes())
    blob[-1] ^= 1
    (damaged / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(shipped_clip.ShippedClipError, match="model.safetensors: sha256"):
        shipped_clip.install(tmp_path / "other", damaged)
    assert not (tmp_path / "other").exists()
    (damaged / "manifest.json").write_text("{")
    with pytest.raises(shipped_clip.ShippedClipError, match="manifest is missing or unreadable"):
        shipped_clip.install(tmp_path / "other", damaged)


def _data_without_clip(tmp_path, monkeypatch):
    """A data directory whose steps before the CLIP are found on disk (their outputs exist),
    with pretraining made to fail: only a copy of a shipped tower can fill the CLIP."""
    data = tmp_path / "data"
    for key, path in runner.prepared_outputs(data).items():
        if key != "CLIP pretraining":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}")
    monkeypatch.setattr(runner, "check_demo_lm", lambda *a: None)

    def no_pretraining(*a, **k):
        raise AssertionError("pretrained although the shipped tower is what it would make")

    monkeypatch.setattr(runner, "pretrain_clip_tower", no_pretraining)
    return data


def test_prepare_data_copies_the_shipped_tower_as_its_own_phase(tmp_path, monkeypatch):
    data = _data_without_clip(tmp_path, monkeypatch)
    phases, lines = runner.Phases(), []
    runner.prepare_data(data, log=lines.append, phases=phases, pretrain_clip=False)
    assert list(phases.seconds) == [runner.SHIPPED_CLIP]
    tower = data / "prepared" / "clip"
    assert json.loads((tower / "config.json").read_text())["model_type"] == "clip_vision_model"
    assert "copied the shipped tower" in lines[0]
    plan = runner.planned_phases(tmp_path / "work", data, clip=runner.SHIPPED_CLIP)
    assert plan[0] == "stage 0"  # nothing left to prepare


def test_prepare_data_copies_the_tower_of_its_clip_views(tmp_path, monkeypatch):
    data = _data_without_clip(tmp_path, monkeypatch)
    runner.prepare_data(data, log=lambda *a: None, pretrain_clip=False, clip_views=("exo",))
    exo = shipped_clip.assets_for(shipped_clip.EXO_VIEWS)
    copied = data / "prepared" / "clip" / "model.safetensors"
    assert copied.read_bytes() == (exo / "model.safetensors").read_bytes()
