"""docs/api.md runs as written: its ```python blocks, in order, in one namespace, in an empty directory."""

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_api_walkthrough_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"^```python\n(.*?)^```$", DOC.read_text(), flags=re.S | re.M)
    assert blocks, f"{DOC}: no ```python blocks"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, code in enumerate(blocks, 1):
        exec(compile(code, f"{DOC.name} block {i}", "exec"), namespace)
    assert (tmp_path / "runs" / "tiny-sml" / "metrics.json").is_file()
    assert len(namespace["eigenvalues"]) == 3 and namespace["eigenvalues"][0] > 0
    assert namespace["w2"] > 0 and (tmp_path / "walkthrough.png").stat().st_size > 1000
