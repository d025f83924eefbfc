"""Checks shared by tests: which stored rows a batch was built from (every fed tensor row is looked up, byte for
byte, among the rows of the split as the loader scales them), the bound on DML self-pairs, a real PNG, a
`mmlab train` that kills itself with SIGKILL at a chosen step of a write, and a training killed (in-process)
right after its first epoch was saved."""

from pathlib import Path

import numpy as np
import pytest
import torch

from mmlab_cli.data.loader import to_tensor


class RowIndex:
    """Row lookup for every modality of one split (rows must be unique: the synthetic data's noise sees to it)."""

    def __init__(self, split):
        self.split = split
        self.index = {}
        for m, a in split.arrays.items():
            rows = to_tensor(np.array(a), torch.device("cpu")).numpy()
            self.index[m] = {r.tobytes(): i for i, r in enumerate(rows)}
            assert len(self.index[m]) == len(rows), f"{split.name}/{m}: duplicate rows, lookup would be ambiguous"

    def rows(self, batches) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """({modality: source row of every fed sample}, fed labels), concatenated over `batches`."""
        src = {m: [] for m in self.index}
        labels = []
        for inputs, y in batches:
            for m, x in inputs.items():
                src[m] += [self.index[m][r.tobytes()] for r in x.detach().cpu().numpy()]
            labels.append(y.cpu().numpy())
        return {m: np.array(v) for m, v in src.items()}, np.concatenate(labels)


def self_pair_bound(labels: np.ndarray, sigmas: float = 6.0) -> float:
    """An upper bound on the fraction of DML partners equal to the sample itself: each is its own partner with
    probability 1 / (its class size), so the count is a sum of Bernoullis; mean + `sigmas` standard deviations."""
    p = 1.0 / np.bincount(labels)[labels]
    return float((p.sum() + sigmas * np.sqrt((p * (1 - p)).sum())) / len(labels))


def png_image(path: Path) -> np.ndarray:
    """The decoded pixels of a real PNG file with something drawn on it (more than two colours)."""
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path}: not a PNG"
    img = mpimg.imread(path)
    assert img.ndim == 3 and min(img.shape[:2]) > 50, f"{path}: {img.shape}"
    assert len(np.unique(img.reshape(-1, img.shape[2]), axis=0)) > 2, f"{path}: blank"
    return img


# Runs `mmlab train` with a fault: the process SIGKILLs itself just before the n-th call of os.<name>
# (os.rename: the checkpoint swaps; os.replace: every atomic file write), so a kill lands exactly
# between two steps of a write, which a timed kill would almost never hit.
CRASHING_TRAIN = """
import os, signal, sys
name, n = sys.argv[1], int(sys.argv[2])
real, calls = getattr(os, name), [0]
def crash(*args, **kwargs):
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(os, name, crash)
sys.argv = ["mmlab", "train", *sys.argv[3:]]
from mmlab_cli.main import main
main()
"""


class Killed(Exception):
    """The death of a training process, simulated in-process."""


def train_killed_after_first_epoch(train, cfg) -> None:
    """`train(cfg)` dying right after epoch 1 is saved: metrics.jsonl, written last by RunPaths, is the moment."""
    from mmlab_cli.engine import runpaths

    write = runpaths.atomic_write_text

    def write_then_die(target, text):
        write(target, text)
        if Path(target).name == "metrics.jsonl":
            raise Killed

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runpaths, "atomic_write_text", write_then_die)
        with pytest.raises(Killed):
            train(cfg)


def run_doc_section(doc: Path, title: str, where: Path) -> list:
    """Run a walkthrough section of a doc as written, in `where`: each ```python block whose first line is
    `# NAME.py` is written to that file, each ```bash block runs line by line (`\\` continuations joined,
    `#` comments dropped): `mmlab ...` in this process through Typer's CliRunner, anything else with bash (the
    venv's bin first on PATH). Returns the CliRunner results; a failing line fails the test with its output."""
    import os
    import re
    import shlex
    import subprocess
    import sys

    from typer.testing import CliRunner

    from mmlab_cli.main import app

    lines, fenced, body, level = doc.read_text().splitlines(), False, [], 0
    for line in lines:  # the section: from its heading to the next heading of its level or above, outside code
        fenced ^= line.startswith("```")
        heading = re.match(r"(#+) (.*)", line) if not fenced else None
        if heading and level and len(heading.group(1)) <= level:
            break
        if heading and heading.group(2) == title:
            level = len(heading.group(1))
        elif level:
            body.append(line)
    assert level, f"{doc.name}: no section '{title}'"
    results = []
    for lang, code in re.findall(r"^```(python|bash)\n(.*?)^```$", "\n".join(body) + "\n", flags=re.S | re.M):
        if lang == "python":
            name = code.splitlines()[0].removeprefix("# ").strip()
            assert name.endswith(".py"), f"{doc.name} '{title}': a python block starts with '# NAME.py'"
            (where / name).write_text(code)
            continue
        for line in code.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if line.startswith("mmlab "):
                result = CliRunner().invoke(app, shlex.split(line)[1:], catch_exceptions=False)
                assert result.exit_code == 0, f"{line}\n{result.output}"
                results.append(result)
            elif line:
                env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
                done = subprocess.run(["bash", "-c", line], cwd=where, env=env, capture_output=True, text=True)
                assert done.returncode == 0, f"{line}\n{done.stdout}{done.stderr}"
    return results
