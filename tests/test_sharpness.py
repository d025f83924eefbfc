"""Sharpness over training (`--track-sharpness`, `--stop-when-flat`, issue 22 item 2): the tracked lambda_max is
the top eigenvalue of the exact Hessian and `mmlab flatness`'s Lanczos value on the same subset, the stability
limit follows the rate schedule, a resumed run is bit-identical, the stop rule ends the last phase where lambda_max
settles, and the report draws it."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from mmlab_cli.analysis.hessian import top_eigenvalues
from mmlab_cli.config import resolve_config
from mmlab_cli.engine import fit, sharpness
from mmlab_cli.data.dataset import PreparedDataset
from mmlab_cli.engine.runpaths import RunPaths
from mmlab_cli.errors import MmlabError
from mmlab_cli.models.curvature import HessianVectorProduct, load_subset, loss_params
from tests.conftest import tiny_config
from tests.test_report import runs_dir  # noqa: F401 (fixture)
from tests.test_train_options import _interrupted_then_resumed, _same_run


class Tiny(torch.nn.Module):
    """The image pooled to 4x4, batch norm, a linear classifier: 68 parameters, so the dense Hessian is cheap."""

    def __init__(self):
        super().__init__()
        self.pool, self.norm, self.linear = torch.nn.AdaptiveAvgPool2d(4), torch.nn.BatchNorm1d(16), \
            torch.nn.Linear(16, 4)

    def forward(self, inputs):
        return SimpleNamespace(logits=self.linear(self.norm(self.pool(inputs["image"]).flatten(1))))


def _exact_lambda_max(model, subset) -> float:
    """The largest eigenvalue of the dense Hessian (torch.autograd.functional.hessian + eigvalsh) in float64."""
    lp = loss_params(model, subset)
    model = copy.deepcopy(model).double().eval()

    def loss(flat):
        logits = [functional_call(model, lp.unflatten(flat), ({k: v.double() for k, v in x.items()},)).logits
                  for x, _ in subset.batches]
        return sum(F.cross_entropy(z, y, reduction="sum") for z, (_, y) in zip(logits, subset.batches)) / subset.size

    h = torch.autograd.functional.hessian(loss, lp.flat().double())
    return torch.linalg.eigvalsh(h)[-1].item()


@pytest.mark.slow
def test_tracked_lambda_max_is_the_exact_hessians_and_flatness_lanczos(tiny_synthetic, monkeypatch):
    """On a 68-parameter model with batch norm (running statistics made unlike the subset's own), the tracker's
    lambda_max equals the dense Hessian's top eigenvalue in eval mode and analysis/hessian.py's Lanczos on the same
    rows; the model comes back in train mode with its buffers untouched, and a warm-started second solve agrees
    in fewer steps. A wrong subset, parameter set or batch-norm mode breaks the equalities."""
    monkeypatch.setattr(sharpness, "SAMPLES", 48)
    monkeypatch.setattr(sharpness, "TOL", 1e-6)
    torch.manual_seed(0)
    model = Tiny()
    model.norm.running_mean.fill_(0.3)
    model.norm.running_var.fill_(0.5)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    tracker = sharpness.Sharpness(PreparedDataset(tiny_synthetic, ["image"]), torch.device("cpu"))
    first = tracker.measure(model)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())
    model.eval()
    subset = load_subset(PreparedDataset(tiny_synthetic, ["image"]), "train", 48, sharpness.SEED, 16,
                         torch.device("cpu"))
    assert subset.indices.tolist() == tracker.subset.indices.tolist()
    lp = loss_params(model, subset)
    lanczos = top_eigenvalues(HessianVectorProduct(model, subset, lp), lp.flat(), 1, 1e-6, lp.numel, 0)
    torch.testing.assert_close(first["lambda_max"], lanczos["eigenvalues"][0], rtol=1e-4, atol=0)
    torch.testing.assert_close(first["lambda_max"], _exact_lambda_max(model, subset), rtol=1e-4, atol=0)
    second = tracker.measure(model)
    assert second["sharpness_converged"] and second["sharpness_steps"] < first["sharpness_steps"]
    torch.testing.assert_close(second["lambda_max"], first["lambda_max"], rtol=1e-4, atol=0)


@pytest.mark.slow
def test_tracking_records_the_limit_per_epoch_and_resumes_bit_identically(tiny_synthetic, tmp_path, monkeypatch):
    """Every 2nd epoch of 5 (StepLR 0.05 -> 0.005 at epoch 3): lambda_max, its solve and 2(1+0.9)/lr of that epoch;
    killed after epoch 2 and resumed (the warm-start vector comes from the checkpoint), the run is the uninterrupted
    one, weights and lambda_max alike; and it trained exactly as a run without tracking (no random draw of
    training's is taken, batch norm's running statistics are untouched)."""
    monkeypatch.setattr(sharpness, "SAMPLES", 32)
    fit.train(tiny_config(tiny_synthetic, tmp_path / "plain", epochs=5))
    options = dict(epochs=5, track_sharpness=2)
    fit.train(tiny_config(tiny_synthetic, tmp_path / "full", **options))
    history = RunPaths(tmp_path / "full").history()
    assert [r["epoch"] for r in history if "lambda_max" in r] == [2, 4]
    for r in history:
        if "lambda_max" in r:
            assert r["stability_limit"] == pytest.approx(2 * 1.9 / r["lr"]) and r["lambda_max"] > 0
    assert [r.get("stability_limit") for r in history][1::2] == pytest.approx([2 * 1.9 / 0.05, 2 * 1.9 / 0.005])
    _interrupted_then_resumed(tiny_config(tiny_synthetic, tmp_path / "killed", **options), monkeypatch, 2)
    _same_run(tmp_path / "killed", tmp_path / "full")
    plain = RunPaths(tmp_path / "plain").history()
    assert [{k: v for k, v in r.items() if k.startswith(("train_", "val_"))} for r in history] == \
        [{k: v for k, v in r.items() if k.startswith(("train_", "val_"))} for r in plain]
    assert (tmp_path / "plain/checkpoints/last/model.safetensors").read_bytes() == \
        (tmp_path / "full/checkpoints/last/model.safetensors").read_bytes()


@pytest.mark.slow
def test_adam_records_no_limit(tiny_synthetic, tmp_path):
    fit.train(tiny_config(tiny_synthetic, tmp_path / "r", epochs=1, optimizer="adam", lr=0.001, track_sharpness=1))
    record = RunPaths(tmp_path / "r").history()[0]
    assert record["stability_limit"] is None and record["lambda_max"] > 0


def _history(lrs, values):
    return [{"epoch": i + 1, "lr": lr, **({"lambda_max": v} if v is not None else {})}
            for i, (lr, v) in enumerate(zip(lrs, values))]


def test_flat_rule_needs_the_final_rate_and_a_spread_below_tol():
    lrs = [0.1] * 2 + [0.01] * 6
    #         0.1 phase | final rate 0.01: 10 -> 12 -> 12.3 -> 12.5 -> 12.7 -> 12.8
    values = [5.0, 5.1, 10.0, 12.0, 12.3, 12.5, 12.7, 12.8]
    ends = [sharpness.flat_at(_history(lrs, values)[:k], 0.01, 0.05, 3) for k in range(1, 9)]
    # spread over the last 4 tracked epochs: epoch 6 (10..12.5) no, 7 (12..12.7 > 5 % of 12) no, 8 (12.3..12.8) yes
    assert ends == [None] * 7 + [8]
    # earlier phases never count, however flat (5.0, 5.1 at 0.1 then 10.0)
    assert sharpness.flat_at(_history([0.1] * 4, [5.0] * 4), 0.01, 0.05, 3) is None
    # untracked epochs are skipped: every 2nd epoch tracked
    assert sharpness.flat_at(_history([0.01] * 7, [1.0, None, 1.0, None, 1.0, None, 1.01]), 0.01, 0.05, 3) == 7


def test_stop_when_flat_without_tracking_is_a_one_line_error():
    with pytest.raises(MmlabError, match="'stop_when_flat' 0.05:3 needs lambda_max: set 'track_sharpness'"):
        resolve_config(None, {"stop_when_flat": "0.05:3"})
    with pytest.raises(MmlabError, match="'stop_when_flat' is '0.05'; give TOL:EPOCHS"):
        resolve_config(None, {"stop_when_flat": "0.05", "track_sharpness": "1"})


@pytest.mark.slow
def test_stop_when_flat_ends_the_last_phase_and_a_resume_stops_there(tiny_synthetic, tmp_path, monkeypatch):
    """lr 0.05 for 2 epochs, then floored at 0.005 (--min-lr) up to a cap of 12; a generous TOL stops the run as
    soon as 2 + 1 tracked epochs at 0.005 exist (epoch 5); the last checkpoint is that epoch; a resume of a run
    killed just before its end trains no further epoch. A tolerance no run meets runs to the cap."""
    monkeypatch.setattr(sharpness, "SAMPLES", 32)
    options = dict(epochs=12, step_size=2, min_lr=0.005, track_sharpness=1, stop_when_flat="10:2")
    assert fit.final_rate(tiny_config(tiny_synthetic, tmp_path / "x", **options)) == pytest.approx(0.005)
    metrics = fit.train(tiny_config(tiny_synthetic, tmp_path / "full", **options))
    assert metrics["stopped"] == "sharpness flat at epoch 5" and RunPaths(tmp_path / "full").resume_epoch() == 5
    assert [r["lr"] for r in RunPaths(tmp_path / "full").history()] == pytest.approx([0.05] * 2 + [0.005] * 3)
    _interrupted_then_resumed(tiny_config(tiny_synthetic, tmp_path / "killed", **options), monkeypatch)
    _same_run(tmp_path / "killed", tmp_path / "full")
    capped = fit.train(tiny_config(tiny_synthetic, tmp_path / "cap", **{**options, "epochs": 4,
                                                                        "stop_when_flat": "1e-12:2"}))
    assert capped["stopped"] == "epochs cap" and capped["sharpness"]["samples"] == sharpness.SAMPLES


@pytest.mark.slow
def test_report_draws_lambda_max_per_method_against_the_limit(runs_dir):
    """Two DML seeds tracked every epoch (lambda_max 10/20, 30/50, 40/60; limit 38, 38, 380): report_sharpness.png
    is written and listed, on a log scale, the DML line at the seeds' means and its dotted limit at 2(1+0.9)/lr;
    a group that tracked nothing draws no line."""
    from matplotlib.colors import to_hex

    from mmlab_cli import figures
    from mmlab_cli.report import write_report

    for run, values in (("dml/s0", (10.0, 30.0, 40.0)), ("dml/s1", (20.0, 50.0, 60.0)), ("uni/s0", None)):
        records = [{"epoch": e, "lr": lr, "train_loss": 1.0, "val_acc": 50.0, "seconds": 1.0,
                    **({"lambda_max": values[e - 1], "stability_limit": 3.8 / lr} if values else {})}
                   for e, lr in ((1, 0.1), (2, 0.1), (3, 0.01))]
        (runs_dir / run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with figures.capture() as drawn:
        _, md, _ = write_report(runs_dir)
    assert (runs_dir / "report_sharpness.png").is_file() and "](report_sharpness.png)" in md
    ax = next(fig for fig in drawn if fig.axes[0].get_title() == "Sharpness over training: λ_max").axes[0]
    assert ax.get_yscale() == "log"
    dml = figures.method_colour("DML (image+audio)").lower()
    lines = {line.get_linestyle(): line.get_ydata().tolist() for line in ax.lines if to_hex(line.get_color()) == dml}
    assert lines == {"-": [15.0, 40.0, 50.0], ":": pytest.approx([38.0, 38.0, 380.0])}
    assert len(ax.lines) == 2


def test_the_limit_needs_sgd_and_one_rate_for_the_whole_network():
    from mmlab_cli.config import TrainConfig

    assert sharpness.stability_limit(TrainConfig(lr=0.1, momentum=0.9), 0.001) == pytest.approx(3800.0)
    assert sharpness.stability_limit(TrainConfig(lr=0.1, momentum=0.0), 0.1) == pytest.approx(20.0)
    assert sharpness.stability_limit(TrainConfig(lr=0.1, encoder_lr={"image": 0.01}), 0.1) is None
    assert sharpness.stability_limit(TrainConfig(optimizer="adamw"), 0.1) is None
