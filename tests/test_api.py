"""The curated public API (exo2ego_jax/__init__.py, docs/api.md) and the one preset idiom."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import exo2ego_jax as e2e
from exo2ego_jax.models import clip, connector, exo2ego, mapping, mistral

ROOT = Path(__file__).resolve().parents[1]


def test_every_public_name_exists_and_is_documented():
    api_doc = (ROOT / "docs" / "api.md").read_text()
    for name in e2e.__all__:
        assert hasattr(e2e, name), name
        assert f"e2e.{name}" in api_doc or f"`{name}`" in api_doc, f"{name} not in docs/api.md"


def test_import_is_light():
    """``import exo2ego_jax`` pulls in no trainer, data pipeline or checkpoint library."""
    heavy = ["tensorboardX", "tensorflow_datasets", "grain", "orbax.checkpoint", "torch", "av"]
    code = (
        "import json, sys; import exo2ego_jax; "
        f"print(json.dumps([m for m in {heavy!r} if m in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == []


@pytest.mark.parametrize(
    "module, config_cls, paper_fields",
    [
        (clip, clip.CLIPVisionConfig, {"image_size": 336, "patch_size": 14, "hidden_size": 1024}),
        (
            mistral,
            mistral.MistralConfig,
            {"hidden_size": 4096, "num_layers": 32, "num_kv_heads": 8},
        ),
        (connector, connector.STCConnectorConfig, {"in_channels": 1024, "out_size": 4096}),
        (mapping, mapping.MappingConfig, {"kind": "resnet", "ngf": 256, "n_blocks": 9}),
        (exo2ego, exo2ego.Exo2EgoConfig, {"num_frames": 16}),
    ],
)
def test_one_preset_idiom(module, config_cls, paper_fields):
    """Every model module has ``tiny(**overrides)`` and ``paper(**overrides)``."""
    paper, tiny = module.paper(), module.tiny()
    assert isinstance(paper, config_cls) and isinstance(tiny, config_cls)
    assert {k: getattr(paper, k) for k in paper_fields} == paper_fields
    assert paper != tiny
    key = next(iter(paper_fields))
    assert getattr(module.tiny(**{key: getattr(paper, key)}), key) == getattr(paper, key)
