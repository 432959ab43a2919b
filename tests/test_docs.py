"""The Python snippets of the user docs run as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNIPPET = re.compile(r"```python\n(.*?)```", re.S)


def _snippets(path: Path) -> list[str]:
    return SNIPPET.findall(path.read_text())


@pytest.mark.parametrize("doc", ["docs/api.md", "README.md"])
def test_doc_snippets_run(doc):
    snippets = _snippets(ROOT / doc)
    assert snippets, f"{doc} has no python snippet"
    for i, code in enumerate(snippets):
        namespace: dict = {"__name__": f"doc_snippet_{i}"}
        exec(compile(code, f"{doc}[snippet {i}]", "exec"), namespace)  # noqa: S102
