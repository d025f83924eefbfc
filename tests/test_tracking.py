"""Experiment tracking: every logger (csv, tensorboard, wandb offline, mlflow's file store) holds every epoch of
metrics.jsonl and every logged step exactly once, also after a resume from a kill between the scalar write and
the checkpoint, plus the hyperparameters, the test metrics and the analyses' summaries; each read back with the
tracker's own reader."""

import csv
import json
import struct
import sys

import pytest

from conftest import tiny_config
from mmlab_cli.config import resolve_config
from mmlab_cli.engine import fit
from mmlab_cli.engine.fit import train
from mmlab_cli.engine.rundir import RunPaths
from mmlab_cli.errors import MmlabError
from mmlab_cli.tracking import LOGGERS, log_analysis

EVERY = 4  # log_every_steps: 11 steps per epoch, so steps 4, 8, ..., 32 (epoch 3: 24, 28, 32)
STEPS = list(range(EVERY, 34, EVERY))


class Killed(Exception):
    pass


def _history(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def resumed_run(tiny_synthetic, tmp_path_factory):
    """Pareto DAGR for 3 epochs with every logger that can run here, steps logged every 4, killed in epoch 3 after
    its scalars and steps were logged but before its checkpoint, then resumed: epoch 3 is trained and logged
    again; then a flatness summary is logged twice (an analysis run again)."""
    loggers = [name for name in LOGGERS if _installed(name)]
    cfg = tiny_config(tiny_synthetic, tmp_path_factory.mktemp("tracking") / "run", regularizer="dagr", logger=loggers,
                      log_every_steps=EVERY)
    save = fit.save_checkpoint

    def killed_at_epoch_3(path, model, state):
        if state["epoch"] == 3:
            raise Killed
        save(path, model, state)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fit, "save_checkpoint", killed_at_epoch_3)
        with pytest.raises(Killed):
            train(cfg)
    run = RunPaths(cfg.out)
    assert len(_history(run.root)) == 2
    train(run.load_config(), resume=True)
    for value in (2.0, 3.0):
        log_analysis(run.root, loggers, "flatness", {"lambda_max": value, "split": "train"}, 3)
    return run.root


def _installed(name: str) -> bool:
    try:
        getattr(LOGGERS[name], "requires", lambda: None)()
    except MmlabError:
        return False
    return True


def _need(name: str) -> None:
    if not _installed(name):
        pytest.skip(f"{name} is not installed (pip install 'mmlab[{'tracking' if name == 'tensorboard' else name}]')")


def _metrics(run) -> dict:
    return json.loads((run / "metrics.json").read_text())


def test_steps_are_logged_once_at_the_cadence(resumed_run):
    steps = [json.loads(line) for line in (resumed_run / "tb" / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == STEPS  # the kill's 24, 28, 32 were dropped and logged again
    assert [s["epoch"] for s in steps] == [1, 1, 2, 2, 2, 3, 3, 3]
    assert {"loss", "ce", "lr", "dispersion", "anchoring", "dagr_alpha"} <= set(steps[0])


def test_csv_rows_are_the_metrics_jsonl_epochs_once(resumed_run):
    with open(resumed_run / "tb" / "scalars.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    history = _history(resumed_run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert {"train_dispersion", "train_anchoring", "train_dagr_alpha", "val_acc_image", "val_acc_audio", "lr"} <= \
        set(rows[0])
    for row, record in zip(rows, history, strict=True):
        assert set(row) == set(record)
        assert {k: float(v) for k, v in row.items()} == pytest.approx(record, rel=0, abs=0)


def test_tensorboard_scalars_are_the_metrics_jsonl_epochs_once(resumed_run):
    _need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(resumed_run / "tb"))
    events.Reload()
    history = _history(resumed_run)
    tags = {"train/loss": "train_loss", "train/acc": "train_acc", "val/acc": "val_acc", "val/acc_audio":
            "val_acc_audio", "train/dispersion": "train_dispersion", "train/dagr_alpha": "train_dagr_alpha", "lr": "lr"}
    assert set(tags) <= set(events.Tags()["scalars"])
    for tag, key in tags.items():
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2, 3], tag  # the epoch logged before the kill is gone
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in history], rel=1e-6), tag
    assert [s.step for s in events.Scalars("step/loss")] == STEPS
    test = events.Scalars("test/acc")
    assert [(s.step, s.value) for s in test] == [(3, pytest.approx(_metrics(resumed_run)["test_acc"], rel=1e-6))]
    assert [s.value for s in events.Scalars("flatness/lambda_max")] == [3.0]  # the analysis run again replaced
    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content).session_start_info
    assert start.hparams["lr"].number_value == 0.05 and start.hparams["regularizer"].string_value == "dagr"
    assert start.hparams["modalities"].string_value == "image+audio"


def test_tensorboard_event_files_hold_each_tag_and_epoch_once(resumed_run):
    """Read raw, as any reader of the event files would (no TensorBoard purge logic): after the resume every
    (tag, step) is written once, and the steps are the history's epochs."""
    _need("tensorboard")
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    seen = [(v.tag, event.step) for path in sorted((resumed_run / "tb").glob("events.out.tfevents.*"))
            for event in EventFileLoader(str(path)).Load() if event.HasField("summary") for v in event.summary.value]
    assert seen and len(seen) == len(set(seen)), [k for k in seen if seen.count(k) > 1][:5]
    assert {step for tag, step in seen if not tag.startswith(("step/", "_hparams_/"))} == {1, 2, 3}
    assert sorted(step for tag, step in seen if tag == "step/loss") == STEPS


def _wandb_records(path):
    """The records of a .wandb file: W&B's LevelDB-style log (a 7-byte header, 32 KiB blocks of chunks with a
    7-byte header: crc32c, length, type FULL/FIRST/MIDDLE/LAST), each record one of W&B's own protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            yield wandb_internal_pb2.Record.FromString(pending)
            pending = b""


def test_wandb_offline_run_holds_config_epochs_steps_test_and_analysis_once(resumed_run):
    _need("wandb")
    training, *analyses = sorted((resumed_run / "wandb").glob("offline-run-*"))  # one run; each analysis resumes it
    assert len(analyses) == 2 and {p.name.split("-")[3] for p in (training, *analyses)} == {  # offline-run-TIME-ID
        (resumed_run / "wandb" / "mmlab-run-id").read_text()}
    records = list(_wandb_records(next(training.glob("*.wandb"))))
    rows = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.HasField("history")]
    epochs, steps = [r for r in rows if "val/acc" in r], [r for r in rows if "step/loss" in r]
    history = _history(resumed_run)
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert [r["val/acc"] for r in epochs] == pytest.approx([r["val_acc"] for r in history], rel=1e-6)
    assert [r["step"] for r in steps] == STEPS
    config = {u.key: json.loads(u.value_json) for r in records if r.HasField("config") or r.HasField("run")
              for u in (r.config.update if r.HasField("config") else r.run.config.update)}
    assert config["lr"] == 0.05 and config["log_every_steps"] == EVERY and config["modalities"] == "image+audio"
    summary = {u.key or "/".join(u.nested_key): json.loads(u.value_json) for r in records if r.HasField("summary")
               for u in r.summary.update}
    assert summary["test/acc"] == pytest.approx(_metrics(resumed_run)["test_acc"], rel=1e-6)
    last = {u.key or "/".join(u.nested_key): json.loads(u.value_json) for r in _wandb_records(
        next(analyses[-1].glob("*.wandb"))) if r.HasField("summary") for u in r.summary.update}
    assert last["flatness/lambda_max"] == 3.0


def test_mlflow_file_store_holds_params_epochs_steps_test_and_analysis_once(resumed_run):
    _need("mlflow")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(resumed_run / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("mmlab").experiment_id])
    history = _history(resumed_run)
    val = client.get_metric_history(run.info.run_id, "val/acc")
    assert [m.step for m in val] == [1, 2, 3]
    assert [m.value for m in val] == pytest.approx([r["val_acc"] for r in history], rel=1e-6)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "step/loss")] == STEPS
    assert run.data.metrics["test/acc"] == pytest.approx(_metrics(resumed_run)["test_acc"], rel=1e-6)
    assert run.data.params["lr"] == "0.05" and run.data.params["modalities"] == "image+audio"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "flatness/lambda_max")] == [2.0, 3.0]


def test_unknown_logger_is_a_one_line_error():
    with pytest.raises(MmlabError, match="'logger' has unknown 'neptune'; choose from csv, tensorboard, wandb"):
        resolve_config(None, {"logger": "csv,neptune"})


def test_missing_tensorboard_fails_before_anything_is_written(tiny_synthetic, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    with pytest.raises(MmlabError, match=r"pip install 'mmlab\[tracking\]'"):
        train(tiny_config(tiny_synthetic, tmp_path / "run", logger=["tensorboard"]))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_an_analysis_appends_its_summary_to_the_runs_loggers(resumed_run):
    """analyse_geometry on a tracked run: its numbers and figures reach the run's loggers through the analysis
    layer's hook (csv, which keeps epochs only, is left as it was)."""
    _need("mlflow")
    from mlflow.tracking import MlflowClient

    from mmlab_cli.analysis.geometry_run import analyse_geometry
    from mmlab_cli.analysis.settings import GeometrySettings

    before = (resumed_run / "tb" / "scalars.csv").read_text()
    analyse_geometry([resumed_run], GeometrySettings(samples=40, ati_samples=8, tsne_samples=0))
    variance = json.loads((resumed_run / "geometry.json").read_text())["modality"]["image"]["variance"]
    client = MlflowClient(tracking_uri=(resumed_run / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("mmlab").experiment_id])
    logged = client.get_metric_history(run.info.run_id, "geometry/modality/image/variance")
    assert [(m.step, m.value) for m in logged] == [(3, pytest.approx(variance, rel=1e-6))]
    assert "geometry/pairs/image-audio/variance_ratio" in run.data.metrics  # '|' is no MLflow name character
    pngs = [f for f in json.loads((resumed_run / "geometry.json").read_text())["files"] if f.endswith(".png")]
    assert pngs and sorted(a.path for a in client.list_artifacts(run.info.run_id, "geometry")) == \
        sorted(f"geometry/{f}" for f in pngs)
    if _installed("tensorboard"):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(resumed_run / "tb"), size_guidance={"images": 0})
        events.Reload()
        assert {f"geometry/{f[:-4]}" for f in pngs} <= set(events.Tags()["images"])
    assert (resumed_run / "tb" / "scalars.csv").read_text() == before
