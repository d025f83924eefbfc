"""A checkpoint swap killed half-way: the previous checkpoint stays whole and findable, and the next save recovers."""

import os

import pytest
import torch

from mmlab_cli.engine.checkpoint import find_checkpoint, load_state, load_weights, save_checkpoint


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("crash_at, survivor", [(1, "last"),  # renaming last -> .last.old fails
                                                (2, ".last.old")])  # last is gone, .last.tmp -> last fails
def test_interrupted_swap_leaves_the_previous_checkpoint(tmp_path, monkeypatch, crash_at, survivor):
    path = tmp_path / "checkpoints" / "last"
    old, new = _model(0), _model(1)
    save_checkpoint(path, old, {"epoch": 1})
    renames, real_rename = [], os.rename

    def rename(src, dst):
        renames.append(src)
        if len(renames) == crash_at:
            # the new checkpoint is complete under its temporary name when the crash hits
            assert load_state(path.with_name(".last.tmp"))["epoch"] == 2
            raise OSError("simulated crash")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(path, new, {"epoch": 2})
    monkeypatch.undo()

    found = find_checkpoint(path)
    assert found == path.with_name(survivor)
    assert path.exists() == (survivor == "last"), "nothing half-written under the valid name"
    assert load_state(found)["epoch"] == 1
    loaded = _model(2)
    load_weights(found, loaded)
    assert _same_weights(loaded, old)

    save_checkpoint(path, new, {"epoch": 2})  # the next save recovers and cleans up
    assert find_checkpoint(path) == path and load_state(path)["epoch"] == 2
    load_weights(path, loaded)
    assert _same_weights(loaded, new)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last"]
