"""The streaming machinery every real-dataset `prepare` shares, on clips that need no media files: a
directory prepared (or half-prepared) otherwise is refused, and NaN output is left out, never averaged."""

from functools import partial

import numpy as np
import pytest

from conftest import snapshot
from data_prep.streaming import PROGRESS, REPORT, Clip, assign_splits, build
from mmlab_cli.data.format import ModalitySpec, read_manifest
from mmlab_cli.errors import MmlabError

LABELS = np.arange(30) % 3
SPLIT = assign_splits(LABELS, seed=0)
CLIPS = [Clip("nan" if i == 4 else f"c{i:02d}", str(s), int(y), {}) for i, (s, y) in enumerate(zip(SPLIT, LABELS))]
OUTPUTS = {"feature": ModalitySpec((2, 3), "float32", "features")}
TRAIN = np.array([c.label + int(c.id[1:]) for c in CLIPS if c.split == "train" and c.id != "nan"], float)


def features(clip: Clip, *, scale: float, stop: str = "") -> dict:
    """`scale` times (label + clip number) everywhere; NaN for clip "nan"; Ctrl-C at clip `stop`."""
    if clip.id == stop:
        raise KeyboardInterrupt
    value = np.nan if clip.id == "nan" else scale * (clip.label + int(clip.id[1:]))
    return {"feature": np.full((2, 3), value, np.float32)}


def prepare(out, scale: float, stop: str = "", force: bool = False):
    return build(out, dataset="toy", classes=["a", "b", "c"], clips=CLIPS, outputs=OUTPUTS,
                 process=partial(features, scale=scale, stop=stop), preprocessing={"scale": scale},
                 sources={"src": "none"}, workers=1, force=force)


def test_finished_dataset_prepared_otherwise_is_refused_until_force(tmp_path):
    out = tmp_path / "toy"
    manifest, report, built = prepare(out, scale=1.0)
    assert built and report["prepared"] == 29
    [nan] = report["left_out"]
    assert nan["clip"] == "nan" and "non-finite" in nan["reason"]
    assert "nan" not in {c for s in ("train", "val", "test") for c in (out / s / "clips.txt").read_text().split()}
    assert manifest["modalities"]["feature"]["mean"] == pytest.approx(TRAIN.mean())
    assert manifest["modalities"]["feature"]["std"] == pytest.approx(TRAIN.std())
    assert manifest["pairing"] == "sample-level"  # a streamed row holds the modalities of one clip

    before = snapshot(out)
    with pytest.raises(MmlabError, match=r"manifest.json: .*different preprocessing.scale.*--force") as e:
        prepare(out, scale=2.0)
    assert str(e.value).startswith(str(out / "manifest.json")) and "\n" not in str(e.value)
    assert snapshot(out) == before
    assert prepare(out, scale=1.0)[2] is False and snapshot(out) == before

    manifest, _, built = prepare(out, scale=2.0, force=True)
    assert built and manifest["preprocessing"] == {"scale": 2.0}
    assert manifest["modalities"]["feature"]["mean"] == pytest.approx(2 * TRAIN.mean())


@pytest.mark.parametrize("scale, force", [(1.0, False), (2.0, True)], ids=["same-parameters-resume", "force"])
def test_half_done_dataset_prepared_otherwise_is_not_resumed(tmp_path, scale, force):
    out = tmp_path / "toy"
    with pytest.raises(KeyboardInterrupt):
        prepare(out, scale=1.0, stop="c20")
    assert (out / PROGRESS).is_file() and not (out / "manifest.json").exists()
    before = snapshot(out)
    with pytest.raises(MmlabError, match=r"half-done dataset .*different preprocessing.scale.*--force") as e:
        prepare(out, scale=2.0)
    assert str(e.value).startswith(str(out / PROGRESS))
    assert snapshot(out) == before
    manifest, report, built = prepare(out, scale=scale, force=force)
    assert built and report["prepared"] == 29 and not (out / PROGRESS).exists() and (out / REPORT).is_file()
    assert manifest["preprocessing"] == read_manifest(out)["preprocessing"] == {"scale": scale}
    np.testing.assert_array_equal(np.load(out / "train" / "feature.npy")[:, 0, 0], scale * TRAIN)
