"""`make reproduce-*` (recipes/reproduce.mk) are thin wrappers over the sweep files in recipes/sweeps/: checked
with `make -n` and the sweep's own `--dry-run` plan: which runs they train, with which recipe, seed and
settings, what they skip or resume, that they analyse and report, and that the make variables reach the sweep."""

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmlab_cli.claims import load_claims
from mmlab_cli.config import TrainConfig, config_to_yaml, resolve_config
from mmlab_cli.main import app
from mmlab_cli.methods.registry import in_slot
from mmlab_cli.sweep import load_sweep

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
AVMNIST_METHODS = ("sml-dagr", "dml-dagr", "sml", "dml", "audio", "image")
AVMNIST_CPU_METHODS = ("sml", "dml", "audio", "image")  # the DML paper's comparisons, 10 seeds in 90 minutes
SYNTH_METHODS = ("sml", "dml", "audio", "image")
# the DAGR paper's Table 1 baselines (ogm: OGM-GE without its noise, not in the table) and D.3 controls
BALANCES, REGULARIZERS = in_slot("balance"), in_slot("regularizer")
DAGR_TABLE1 = ("dagr", "dgl", *(b.replace("ogm", "ogm-ge") for b in BALANCES if b not in ("ogm", "ogm-ge")), "ogm-ge")
DAGR_METHODS = (*DAGR_TABLE1, *(r for r in REGULARIZERS if r != "dagr"), "sml")


def dry_run(*args: str) -> list[str]:
    """The shell lines `make -n` would run."""
    out = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(ROOT), *args, "BIN=/fake/bin"],
                         capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def sweep_line(lines: list[str]) -> list[str]:
    """The arguments of the one `mmlab sweep` call the target makes."""
    calls = [shlex.split(line) for line in lines if " sweep " in line]
    assert len(calls) == 1 and calls[0][0] == "/fake/bin/mmlab", lines
    return calls[0][1:]


def plan(args: list[str], monkeypatch) -> dict:
    """What that sweep would do: `mmlab sweep ... --json` (the plan as JSON) from the repository root."""
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture
def avmnist_data(tmp_path, tiny_synthetic) -> Path:
    """A stand-in for data/avmnist (image and audio, like AVMNIST): the plan checks every dataset."""
    return Path(shutil.copytree(tiny_synthetic, tmp_path / "avmnist"))


def test_every_method_of_the_reproductions_has_a_recipe():
    for name, methods in (("avmnist", AVMNIST_METHODS), ("avmnist-cpu", AVMNIST_CPU_METHODS), ("synthetic", SYNTH_METHODS),
                          ("dagr-synthetic", DAGR_METHODS), ("dagr-crema-d", DAGR_METHODS[:-1]),
                          ("dagr-kinetics-sounds", DAGR_TABLE1)):
        sweep = load_sweep(ROOT / "recipes" / "sweeps" / f"{name}.yaml")
        assert sorted(Path(r).stem for r in sweep.recipes) == sorted(methods), name
        assert all((ROOT / r).is_file() for r in sweep.recipes), name


def test_avmnist_trains_every_method_and_seed_then_analyses_and_reports(tmp_path, avmnist_data, monkeypatch):
    lines = dry_run("reproduce-avmnist", "SEEDS=0 1", "JOBS=2", f"AVMNIST_RUNS={tmp_path}/runs",
                    f"AVMNIST_DATA={avmnist_data}", "DEVICE=cpu")
    assert f"/fake/bin/mmlab prepare avmnist --mnist ../shared/data/mnist --fsdd ../shared/data/fsdd " \
           f"--noise white --snr-db -7.5 --out {avmnist_data}" in lines
    args = sweep_line(lines)
    assert args[:2] == ["sweep", "recipes/sweeps/avmnist-cpu.yaml"] and "--jobs 2" in " ".join(args)
    result = plan(args, monkeypatch)
    jobs = {j["name"]: j for j in result["jobs"]}
    assert sorted(jobs) == sorted(f"{m}/seed{s}" for m in AVMNIST_CPU_METHODS for s in (0, 1))
    assert result["threads"] == 1  # one per run, however many JOBS go at once: JOBS never changes the numbers
    for m in AVMNIST_CPU_METHODS:
        job = jobs[f"{m}/seed1"]
        cfg = job["config"]
        assert job["recipe"] == f"recipes/avmnist/{m}.yaml" and job["state"] == "new"
        assert (cfg["seed"], cfg["device"], cfg["data"], cfg["out"]) == (1, "cpu", str(avmnist_data),
                                                                         f"{tmp_path}/runs/{m}/seed1")
        # one SGD regime for every method: 0.1, 0.01, then lr 0.001 (stability limit 3800) until lambda_max is flat
        # (5 % over 3 tracked epochs), 20 epochs at most
        assert cfg["encoder"] == {"image": "tiny_cnn", "audio": "pooled_cnn"}
        assert (cfg["optimizer"], cfg["momentum"], cfg["lr"], cfg["gamma"], cfg["step_size"], cfg["epochs"]) == \
            ("sgd", 0.9, 0.1, 0.1, 5, 20)
        assert (cfg["min_lr"], cfg["track_sharpness"], cfg["stop_when_flat"]) == (0.001, 1, "0.05:3")
        recipe = resolve_config(ROOT / job["recipe"], {})  # the recipe's method is kept
        assert (cfg["pairing"], cfg["regularizer"], cfg["modalities"]) == \
            (recipe.pairing, recipe.regularizer, recipe.modalities)
    sweep = load_sweep(ROOT / args[1])
    assert list(sweep.analyses) == ["flatness", "robustness", "geometry"]
    assert sweep.seeds == list(range(10))  # the primary claims' seeds
    for name, invocations in sweep.analyses.items():  # every analysis once, at the last checkpoint (the claims')
        assert [a[:2] for a in invocations] == [["--checkpoint", "last"]], name
    assert sweep.analyses["flatness"][0][2:4] == ["--metric", "hessian,lpf,fgap"]  # Figure 4, no 2-D landscape
    eps = sweep.analyses["robustness"][0]  # eps50: Table 12's rows, on a curve that goes on until it flattens
    assert [float(e) for e in eps[eps.index("--eps-curve") + 1].split(",")][-4:] == [0.5, 1, 2, 5]
    assert sweep.report == [["--checkpoint", "last", "--claims", "recipes/claims/dml-paper.yaml"]]
    keys = {name: {**j["config"], "n_modalities": len(j["config"]["modalities"])} for name, j in jobs.items()}
    for claim in load_claims(ROOT / sweep.report[0][3]).claims:  # each side: one method, or several to pick from
        for side in claim.sides:
            matched = {n.split("/")[0] for n, cfg in keys.items() if all(cfg[k] == v for k, v in side.where)}
            assert matched and (side.best_of or len(matched) == 1), (claim.id, matched)
    assert not any(line.startswith("rm ") for line in lines)


def test_finished_runs_are_skipped_and_interrupted_ones_resumed(tmp_path, avmnist_data, monkeypatch):
    runs = tmp_path / "runs"
    args = sweep_line(dry_run("reproduce-avmnist", "SEEDS=0", f"AVMNIST_RUNS={runs}", f"AVMNIST_DATA={avmnist_data}",
                              "DEVICE=cpu"))
    configs = {j["name"]: j["config"] for j in plan(args, monkeypatch)["jobs"]}
    for name, finished in (("sml/seed0", True), ("dml/seed0", False)):  # as `mmlab train` leaves them
        cfg = TrainConfig(**{**configs[name], "data": str(avmnist_data.resolve())})
        (runs / name).mkdir(parents=True)
        (runs / name / "config.yaml").write_text(config_to_yaml(cfg))
        if finished:
            (runs / name / "metrics.json").write_text("{}")
    states = {j["name"]: j["state"] for j in plan(args, monkeypatch)["jobs"]}
    assert (states["sml/seed0"], states["dml/seed0"], states["image/seed0"]) == ("finished", "interrupted", "new")


def test_cuda_runs_the_recipes_as_written(tmp_path, avmnist_data, monkeypatch):
    args = sweep_line(dry_run("reproduce-avmnist", "SEEDS=0", f"AVMNIST_RUNS={tmp_path}/runs",
                              f"AVMNIST_DATA={avmnist_data}", "DEVICE=cuda"))
    assert args[1] == "recipes/sweeps/avmnist.yaml" and "--jobs 1" in " ".join(args)
    for job in plan(args, monkeypatch)["jobs"]:
        cfg, recipe = job["config"], resolve_config(ROOT / job["recipe"], {})
        assert (cfg["encoder"], cfg["epochs"], cfg["embed_dim"], cfg["device"]) == \
            (recipe.encoder, recipe.epochs, recipe.embed_dim, "cuda")


def test_synthetic_sweep_prepares_each_level_and_trains_on_it(tmp_path, tiny_synthetic, monkeypatch):
    data = tmp_path / "data"
    lines = dry_run("reproduce-synthetic", "SEEDS=0", "AUDIO_INFO=0.3 0.05", f"SYNTH_RUNS={tmp_path}/runs",
                    f"SYNTH_DATA={data}", "DEVICE=cpu")
    for level in ("0.3", "0.05"):
        assert (f"/fake/bin/mmlab prepare synthetic --image-info 0.2 --audio-info {level} "
                f"--out {data}/audio-{level}") in lines
        shutil.copytree(tiny_synthetic, data / f"audio-{level}")  # what the prepare line makes
    assert lines.index(next(line for line in lines if " sweep " in line)) > \
        max(i for i, line in enumerate(lines) if "prepare synthetic" in line)  # prepared before the sweep
    jobs = {j["name"]: j for j in plan(sweep_line(lines), monkeypatch)["jobs"]}
    assert len(jobs) == 2 * len(SYNTH_METHODS)
    for level in ("0.3", "0.05"):
        job = jobs[f"sml/data=audio-{level}/seed0"]
        assert job["recipe"] == "recipes/synthetic/sml.yaml" and job["config"]["data"] == f"{data}/audio-{level}"
    avmnist = load_sweep(ROOT / "recipes/sweeps/avmnist-cpu.yaml").overrides
    for job in jobs.values():  # the AVMNIST regime for every method, whatever its recipe's optimizer (the demo's Adam)
        cfg = job["config"]
        assert (cfg["optimizer"], cfg["momentum"]) == ("sgd", 0.9)
        assert all(cfg[k] == avmnist[k] for k in ("lr", "step_size", "epochs", "min_lr", "track_sharpness",
                                                  "stop_when_flat"))
    assert re.search(r"--seeds 0 --jobs \d+ --set device=cpu", " ".join(sweep_line(lines)))


def test_synthetic_defaults_to_the_balanced_level_with_ten_seeds(tmp_path):
    """`make reproduce-synthetic` alone: the level the claims test, and enough seeds for the sign-flip test that
    decides below ten to reach p < 0.05 (its smallest two-sided p at five seeds is 0.0625)."""
    lines = dry_run("reproduce-synthetic", f"SYNTH_DATA={tmp_path}")
    assert [line for line in lines if "prepare synthetic" in line] == \
        [f"/fake/bin/mmlab prepare synthetic --image-info 0.2 --audio-info 0.3 --out {tmp_path}/audio-0.3"]
    assert "--seeds" not in sweep_line(lines)  # the sweep file's own seeds
    assert load_sweep(ROOT / "recipes/sweeps/synthetic.yaml").seeds == list(range(10))


def test_dagr_trains_table1_and_d3_on_one_imbalance_level_then_analyses_and_reports(tmp_path, tiny_synthetic,
                                                                                   monkeypatch):
    data = tmp_path / "data" / "coupled"
    lines = dry_run("reproduce-dagr", "SEEDS=0 2", "JOBS=2", f"DAGR_DATA={data}", f"DAGR_RUNS={tmp_path}/runs",
                    "DEVICE=cpu")
    # one coupled level: sample-level pairs, so anchoring, drift and Recall@1 are sample-level (issue 22)
    assert f"/fake/bin/mmlab prepare synthetic --image-info 0.7 --audio-info 0.25 --coupling 0.5 --out {data}" in lines
    shutil.copytree(tiny_synthetic, data)  # what the prepare line makes
    args = sweep_line(lines)
    assert args[1] == "recipes/sweeps/dagr-synthetic.yaml" and "--seeds 0,2 --jobs 2" in " ".join(args)
    jobs = {j["name"]: j for j in plan(args, monkeypatch)["jobs"]}
    assert sorted(jobs) == sorted(f"{m}/seed{s}" for m in DAGR_METHODS for s in (0, 2))
    methods = {(c["scheme"], c["regularizer"], c["balance"]) for c in (j["config"] for j in jobs.values())}
    assert len(methods) == len(DAGR_METHODS)  # no two recipes train the same method
    assert {b for _, _, b in methods} == set(BALANCES) - {"ogm"} | {"none"}
    assert {r for _, r, _ in methods} == set(REGULARIZERS) | {"none"}
    for job in jobs.values():
        cfg = job["config"]
        assert (cfg["device"], cfg["data"], cfg["epochs"]) == ("cpu", str(data), 8)
        assert cfg["out"] == f"{tmp_path}/runs/synthetic/{job['name']}"
        # every epoch-based key acts within the 8 epochs
        assert cfg["gblend_super_epoch"] < 8 if cfg["balance"] == "gblending" else True
        assert cfg["relearn_every"] * cfg["relearn_times"] < 8 if cfg["balance"] == "relearn" else True
    sweep = load_sweep(ROOT / args[1])
    text = (ROOT / args[1]).read_text()  # run by hand, the sweep file reads the coupled level the target prepares
    assert "--coupling 0.5 \\\n#       --out data/dagr-synthetic/image-0.7-audio-0.25-coupling-0.5" in text
    assert "\ndata: data/dagr-synthetic/image-0.7-audio-0.25-coupling-0.5\n" in text
    assert list(sweep.analyses) == ["robustness", "geometry"]
    assert "missing-zero" in sweep.analyses["robustness"][0][sweep.analyses["robustness"][0].index("--corruption") + 1]
    assert sweep.report == [["--claims", "recipes/claims/dagr-paper.yaml"]]
    for claim in load_claims(ROOT / sweep.report[0][1]).claims:  # each side is one method of the sweep: 2 seeds
        for side in claim.sides:
            assert sum(all(j["config"][k] == v for k, v in side.where) for j in jobs.values()) == 2, claim.id


def audio_visual(src: Path, out: Path) -> Path:
    """A stand-in for a prepared CREMA-D or Kinetics-Sounds (audio + visual): the plan opens every dataset."""
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("depth.npy"))
    manifest = json.loads((out / "manifest.json").read_text())
    modalities = manifest["modalities"]
    manifest["modalities"] = {"audio": modalities["audio"], "visual": modalities["image"]}
    (out / "manifest.json").write_text(json.dumps(manifest))
    for split in manifest["splits"]:
        (out / split / "image.npy").rename(out / split / "visual.npy")
    return out


def test_dagr_on_cuda_runs_the_crema_d_and_kinetics_sounds_recipes_as_written(tmp_path, tiny_synthetic, monkeypatch):
    lines = dry_run("reproduce-dagr", "SEEDS=0", f"DAGR_RUNS={tmp_path}/runs", "DEVICE=cuda", "CREMA_D=/raw/cremad",
                    "KINETICS_SOUNDS=/raw/ks", f"CREMA_D_DATA={tmp_path}/crema-d", f"KS_DATA={tmp_path}/ks")
    assert f"/fake/bin/mmlab prepare crema-d --src /raw/cremad --out {tmp_path}/crema-d" in lines
    assert f"/fake/bin/mmlab prepare kinetics-sounds --src /raw/ks --out {tmp_path}/ks" in lines
    calls = [shlex.split(line)[1:] for line in lines if " sweep " in line]
    assert [c[1] for c in calls] == ["recipes/sweeps/dagr-crema-d.yaml", "recipes/sweeps/dagr-kinetics-sounds.yaml"]
    for args, name in zip(calls, ("crema-d", "ks")):
        audio_visual(tiny_synthetic, tmp_path / name)
        for job in plan(args, monkeypatch)["jobs"]:
            cfg, recipe = job["config"], resolve_config(ROOT / job["recipe"], {})
            assert (cfg["encoder"], cfg["epochs"], cfg["batch_size"], cfg["lr"], cfg["device"]) == \
                (recipe.encoder, recipe.epochs, recipe.batch_size, recipe.lr, "cuda")
            assert (cfg["epochs"], cfg["optimizer"], cfg["clip_grad_norm"]) == (100, "sgd", 40.0)  # DGL's protocol


def test_the_snr_pilot_trains_audio_alone_per_level_with_the_reproductions_settings():
    """`make avmnist-snr-pilot`: one prepared dataset per SNR, audio alone on each with the reproduction's own
    settings (every override the pilot sets is the reproduction's; its 14 epochs are where the reproduction's
    schedule reaches its last rate plus four, before the --stop-when-flat phase), three seeds, no analyses."""
    lines = dry_run("avmnist-snr-pilot", 'SNR_PILOT=-6 -8')
    prepares = [line for line in lines if "prepare avmnist" in line]
    assert [re.search(r"--snr-db (\S+)", p).group(1) for p in prepares] == ["-6", "-8"]
    assert "--grid data=data/avmnist-snr/snr-6,data/avmnist-snr/snr-8" in " ".join(sweep_line(lines))
    pilot = load_sweep(ROOT / "recipes/sweeps/avmnist-snr-pilot.yaml")
    reproduction = load_sweep(ROOT / "recipes/sweeps/avmnist-cpu.yaml")
    assert pilot.recipes == ["recipes/avmnist/audio.yaml"] and pilot.analyses == {} and pilot.report is None
    assert {k: v for k, v in pilot.overrides.items() if k != "epochs"} == \
        {k: reproduction.overrides[k] for k in pilot.overrides if k != "epochs"}
    assert pilot.overrides["epochs"] == 2 * reproduction.overrides["step_size"] + 4 <= reproduction.overrides["epochs"]
    assert len(pilot.seeds) == 3
