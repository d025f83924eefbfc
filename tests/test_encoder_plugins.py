"""Encoder plug-ins (mmlab_cli/models/encoders.py): `--encoder MOD=file.py:factory | pkg.module:factory | an
entry point` builds the user's module, config.yaml records the reference, and resume, load_run and every analysis
re-import it; encoders declare the kinds they read, and a mismatch is one line before anything is written."""

import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from checks import run_doc_section
from conftest import tiny_config
from mmlab_cli.data.format import ModalitySpec
from mmlab_cli.engine.fit import train
from mmlab_cli.engine.rundir import load_run
from mmlab_cli.errors import MmlabError
from mmlab_cli.main import app
from mmlab_cli.models.encoders import create_encoder

DOCS = Path(__file__).resolve().parents[1] / "docs"
FEATURES = ModalitySpec((6,), "float32", "features", mean=1.0, std=2.0)
IMAGE = ModalitySpec((1, 8, 8), "float32", "image")

PLUGIN = '''
from torch import nn


class Scale(nn.Module):
    """x -> x @ W: records the spec it was built for."""

    def __init__(self, spec, dim):
        super().__init__()
        self.spec, self.linear = spec, nn.Linear(spec.shape[0], dim, bias=False)

    def forward(self, x):
        return self.linear(x)


def build(spec, dim):
    return Scale(spec, dim)


build.reads = ("features",)
undeclared = lambda spec, dim: nn.Linear(1, dim)
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "userpkg").mkdir()
    (tmp_path / "userpkg" / "__init__.py").write_text("")
    (tmp_path / "userpkg" / "enc.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("userpkg.enc", None)
    sys.modules.pop("userpkg", None)


def test_a_module_reference_builds_the_users_module_from_the_spec_after_standardising(plugin):
    enc = create_encoder("userpkg.enc:build", FEATURES, 3)
    body = enc[1]
    assert type(body).__name__ == "Scale" and body.spec == FEATURES and body.linear.out_features == 3
    x = torch.randn(4, 6)
    torch.testing.assert_close(enc(x), body.linear((x - 1.0) / 2.0))  # the manifest's mean and std first


def test_a_file_reference_and_an_entry_point_name_find_the_same_factory(plugin, monkeypatch):
    file_enc = create_encoder(f"{plugin / 'userpkg' / 'enc.py'}:build", FEATURES, 3)
    assert type(file_enc[1]).__name__ == "Scale"
    dist = plugin / "userpkg_dist-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: userpkg-dist\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mmlab.encoders]\nscale = userpkg.enc:build\n")
    assert type(create_encoder("scale", FEATURES, 3)[1]).__name__ == "Scale"


@pytest.mark.parametrize("name, message", [
    ("userpkg.nope:build", r"^encoder 'userpkg.nope:build': cannot import it \(ModuleNotFoundError: No module named "
                           r"'userpkg.nope'\); give pkg.module:factory importable here \(PYTHONPATH\) or "
                           r"path/to/file.py:factory$"),
    ("userpkg.enc:missing", r"^encoder 'userpkg.enc:missing': cannot import it \(AttributeError"),
    ("missing.py:build", r"^encoder 'missing.py:build': cannot import it \(FileNotFoundError"),
    ("userpkg.enc:undeclared", r"^encoder 'userpkg.enc:undeclared': a plug-in is a callable factory\(spec, dim\) "
                               r"whose `reads` lists"),
    ("my_cnn", r"^unknown encoder 'my_cnn'; choose one of small_cnn, .*, bert, torchvision:NAME, timm:NAME, hf:DIR, "
               r"or a plug-in pkg.module:factory"),
])
def test_a_reference_that_cannot_be_used_is_one_line_naming_it(plugin, name, message):
    with pytest.raises(MmlabError, match=message):
        create_encoder(name, FEATURES, 3)


@pytest.mark.parametrize("name, spec, message", [
    ("userpkg.enc:build", IMAGE, r"^encoder 'userpkg.enc:build' cannot read an image modality \(it reads features\); "
                                 r"for image use small_cnn or tiny_cnn"),
    ("resnet18", FEATURES, r"^encoder 'resnet18' cannot read a features modality \(it reads image, spectrogram, "
                           r"frames\); for features use mlp$"),
    ("transformer", IMAGE, r"cannot read an image modality \(it reads sequence\)"),
])
def test_an_encoder_reads_only_the_kinds_it_declares(plugin, name, spec, message):
    with pytest.raises(MmlabError, match=message):
        create_encoder(name, spec, 3)


def test_a_mismatch_stops_train_before_anything_is_written(tiny_synthetic, tmp_path):
    """`--encoder audio=mlp` is fine (mlp reads anything flattened); a kind the encoder does not read used to train
    an MLP silently while config.yaml recorded the name; now the preflight stops with one line, no run directory."""
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--data", str(tiny_synthetic), "--modalities", "image,audio",
                                      "--encoder", "image=tiny_cnn,audio=transformer", "--out", str(out)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "encoder 'transformer' cannot read a spectrogram modality" in result.output and not out.exists()


@pytest.mark.slow
def test_a_file_plugin_is_recorded_absolute_and_reimported_by_load_run(tiny_synthetic, tmp_path, monkeypatch):
    (tmp_path / "mine.py").write_text("from mmlab_cli.models.encoders import reads, tiny_cnn\n\n\n"
                                      "@reads('image', 'spectrogram')\ndef build(spec, dim):\n"
                                      "    return tiny_cnn(spec.shape[0], dim)\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    metrics = train(tiny_config(tiny_synthetic, out, encoder={"image": "mine.py:build", "audio": "tiny_cnn"},
                                epochs=1))
    run = load_run(out)
    assert run.config.encoder == {"image": f"{tmp_path / 'mine.py'}:build", "audio": "tiny_cnn"}
    monkeypatch.chdir(tiny_synthetic)  # from elsewhere: the recorded path is absolute
    assert load_run(out).metrics["test_acc"] == metrics["test_acc"]
    (tmp_path / "mine.py").rename(tmp_path / "moved.py")
    for key in [k for k in sys.modules if k.startswith("mmlab_encoder_")]:
        monkeypatch.delitem(sys.modules, key)
    result = CliRunner().invoke(app, ["geometry", str(out), "--samples", "30", "--tsne-samples", "0"])
    assert result.exit_code == 2 and f"encoder '{tmp_path / 'mine.py'}:build': cannot import it" in result.output


@pytest.mark.slow
def test_plugins_doc_trains_resumes_and_analyses_a_plugin_encoder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = run_doc_section(DOCS / "plugins.md", "Your own encoder in `mmlab train`", tmp_path)
    assert "resuming" in results[2].output  # the resume rebuilt the plug-in model and loaded its checkpoint
    for analysis in ("flatness.json", "robustness.json", "geometry.json"):
        assert (tmp_path / "runs" / "mine" / analysis).is_file(), analysis


@pytest.mark.slow
@pytest.mark.parametrize("doc, title", [(DOCS.parent / "README.md", "Your own data and model"),
                                        (DOCS / "training.md", "Your own data and model: a walkthrough")])
def test_your_own_data_and_model_walkthrough_runs_to_a_report(tmp_path, monkeypatch, doc, title):
    monkeypatch.chdir(tmp_path)
    run_doc_section(doc, title, tmp_path)
    config = (next((tmp_path / "runs").rglob("config.yaml"))).read_text()
    assert f"{tmp_path / 'my_net.py'}:build" in config  # the plug-in, by its absolute path
    assert (tmp_path / "runs" / "mine" / "report.md").is_file()


def test_the_preflight_train_and_sweep_share_names_the_mismatch(tiny_synthetic, tmp_path):
    from mmlab_cli.data.dataset import PreparedDataset
    from mmlab_cli.engine.fit import preflight

    cfg = tiny_config(tiny_synthetic, tmp_path / "run", encoder={"image": "tiny_cnn", "audio": "bert"})
    with pytest.raises(MmlabError, match=r"^encoder 'bert' cannot read a spectrogram modality \(it reads text_tokens\)"):
        preflight(cfg, PreparedDataset(tiny_synthetic, ["image", "audio"]))
    assert not (tmp_path / "run").exists()
