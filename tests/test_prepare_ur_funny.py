"""`mmlab prepare ur-funny` on a tiny release written in the official pickle layout (ROC-HCI/UR-FUNNY V2),
then a 3-modality sequence run trained one epoch and every analysis run on it as plain functions."""

import json
import pickle

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_config
from data_prep.ur_funny import prepare_ur_funny
from mmlab_cli.analysis.flatness import FlatnessSettings, flatness
from mmlab_cli.analysis.geometry import GeometrySettings, geometry
from mmlab_cli.analysis.robustness import RobustnessSettings, robustness
from mmlab_cli.data.dataset import PreparedDataset
from mmlab_cli.engine.fit import train
from mmlab_cli.engine.rundir import load_run
from mmlab_cli.main import app

CPU = torch.device("cpu")
DIMS = {"covarep": 81, "openface": 371}
VOCAB = 30


def _release(root, folds=None, drop_covarep=()):
    """A release of 40 segments: 1-2 context sentences of 2-4 words and a punchline of 1-5 words each. The
    humorous segments' punchline words come from the second half of the vocabulary, so text is informative."""
    rng = np.random.default_rng(0)
    ids = [f"seg{i}" for i in range(40)]
    folds = folds or {"train": ids[:24], "dev": ids[24:30], "test": ids[30:]}
    language, sdks, labels = {}, {k: {} for k in DIMS}, {}
    for i, sid in enumerate(ids):
        y = i % 2
        context = [list(rng.integers(0, VOCAB, rng.integers(2, 5))) for _ in range(rng.integers(1, 3))]
        punchline = list(rng.integers(VOCAB // 2 * y, VOCAB // 2 * (y + 1), rng.integers(1, 6)))
        language[sid] = {"punchline_embedding_indexes": punchline, "context_embedding_indexes": context,
                         "punchline_sentence": "p", "context_sentences": ["c"] * len(context),
                         "punchline_intervals": [], "context_intervals": []}
        for k, d in DIMS.items():
            sdks[k][sid] = {"punchline_features": rng.normal(size=(len(punchline), d)).tolist(),
                            "context_features": [rng.normal(size=(len(s), d)).tolist() for s in context]}
        labels[sid] = y
    sdks["covarep"]["seg0"]["punchline_features"][0][3] = float("-inf")  # as COVAREP has on silent words
    for sid in drop_covarep:
        del sdks["covarep"][sid]
    embeddings = rng.normal(size=(VOCAB, 300)).tolist()
    root.mkdir(parents=True, exist_ok=True)
    for name, obj in {"data_folds": folds, "language_sdk": language, "word_embedding_list": embeddings,
                      "covarep_features_sdk": sdks["covarep"], "openface_features_sdk": sdks["openface"],
                      "humor_label_sdk": labels}.items():
        with open(root / f"{name}.pkl", "wb") as f:
            pickle.dump(obj, f)
    return language, sdks, np.asarray(embeddings, np.float32)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("urfunny")
    language, sdks, embeddings = _release(root / "src", drop_covarep=["seg31"])
    manifest, report, built = prepare_ur_funny(root / "src", root / "out", max_length=8)
    return root, manifest, report, language, sdks, embeddings


def test_official_folds_shapes_and_missing_segments(prepared):
    root, manifest, report, *_ = prepared
    assert {m: (s["shape"], s["kind"]) for m, s in manifest["modalities"].items()} == {
        "text": ([8, 301], "sequence"), "acoustic": ([8, 82], "sequence"), "visual": ([8, 372], "sequence")}
    assert {s: v["count"] for s, v in manifest["splits"].items()} == {"train": 24, "val": 6, "test": 9}
    assert report["left_out"] == [{"clip": "seg31", "path": str(root / "src" / "covarep_features_sdk.pkl"),
                                   "reason": "segment 'seg31' of fold test is not in it"}]
    assert manifest["preprocessing"]["non_finite_set_to_zero"] == {"text": 0, "acoustic": 1, "visual": 0}
    assert manifest["pairing"] == "sample-level"  # text, audio and video of one segment
    assert np.array_equal(np.load(root / "out" / "val" / "labels.npy"), np.arange(24, 30) % 2)


def test_steps_are_context_then_punchline_last_words_kept(prepared):
    root, _, _, language, sdks, embeddings = prepared
    text = np.load(root / "out" / "train" / "text.npy")
    acoustic = np.load(root / "out" / "train" / "acoustic.npy")
    for row in (0, 1, 5):
        seg = language[f"seg{row}"]
        words = [w for s in seg["context_embedding_indexes"] for w in s] + seg["punchline_embedding_indexes"]
        kept = words[-8:]
        n = len(kept)
        assert np.array_equal(text[row, :, 0], np.arange(8) < n)  # the mask
        assert np.allclose(text[row, :n, 1:], embeddings[kept]) and not text[row, n:].any()
        cov = sdks["covarep"][f"seg{row}"]
        steps = np.concatenate([np.asarray(s).reshape(-1, 81) for s in cov["context_features"]] +
                               [np.asarray(cov["punchline_features"])])[-8:]
        assert np.allclose(acoustic[row, :n, 1:], np.nan_to_num(steps, neginf=0.0))


def test_rerun_skips_and_cli_names_a_missing_pickle(prepared, tmp_path):
    root, manifest, *_ = prepared
    again, _, built = prepare_ur_funny(root / "src", root / "out", max_length=8)
    assert not built and again == manifest
    (tmp_path / "data_folds.pkl").write_bytes(pickle.dumps({"train": []}))
    result = CliRunner().invoke(app, ["prepare", "ur-funny", "--src", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "language_sdk.pkl: missing" in result.output


def test_three_sequence_modalities_train_and_every_analysis_runs(prepared):
    root = prepared[0]
    out = root / "run"
    train(tiny_config(root / "out", out, modalities=["text", "acoustic", "visual"], encoder="transformer",
                      epochs=1, batch_size=8, lr=0.01))
    run = load_run(out)
    data = PreparedDataset(root / "out")
    r = robustness(run.model, data, RobustnessSettings(levels=[0, 1], batch_size=16), CPU)
    assert set(r["pgd"]) == {"text", "acoustic", "visual"}
    assert all(0 < p["max_abs_delta"] <= p["settings"]["eps"] + 1e-6 for p in r["pgd"].values())  # within the ball
    assert all(p["settings"]["eps"] == pytest.approx(0.1 * p["settings"]["input_std"]) for p in r["pgd"].values())
    assert all(c["acc"][0] == r["clean"]["acc"] for cs in r["corruptions"].values() for c in cs.values())
    f = flatness(run.model, data, FlatnessSettings(metrics=["hessian", "lpf", "fgap"], samples=16, top_k=1,
                                                   max_steps=5, trace_probes=0, lpf_draws=2, fgap_directions=1,
                                                   fgap_radii=[0, 1]), CPU)
    assert f["lambda_max"] > 0 and np.isfinite([f["lpf_loss"], f["fgap_mean_test"]]).all()
    json.dumps(f, allow_nan=False)
    g, _ = geometry(run.model, data, GeometrySettings(samples=9, tsne_samples=0, negatives=2), CPU)
    assert set(g["pairs"]) == {"text|acoustic", "text|visual", "acoustic|visual"}


def test_padding_and_mask_never_reach_the_embedding(prepared):
    """The transformer's embedding ignores what padded steps hold (an all-padding sample embeds to zeros),
    and PGD and a gaussian corruption change only the features of real steps: masks flow through the
    model, the attacks and the corruptions."""
    from mmlab_cli.analysis.attacks import pgd, pgd_settings
    from mmlab_cli.analysis.corruptions import CORRUPTIONS
    from mmlab_cli.analysis.robustness import real_steps
    from mmlab_cli.models.fusion import LateFusion

    data = PreparedDataset(prepared[0] / "out")
    torch.manual_seed(0)
    model = LateFusion(data.specs, 2, encoder="transformer", dim=8).eval()
    encoder = model.encoders["text"]
    x = torch.from_numpy(np.array(data.split("test").arrays["text"][:4]))
    real = x[..., 0] > 0.5
    assert real.any(1).all() and not real.all()
    garbage = x.clone()
    garbage[..., 1:] += (~real).unsqueeze(-1) * 100.0  # only padded steps change
    empty = torch.zeros_like(x[:1])
    with torch.no_grad():
        assert torch.allclose(encoder(x), encoder(garbage), atol=1e-5)
        assert torch.equal(encoder(empty), torch.zeros(1, 8))
    y = torch.from_numpy(np.array(data.split("test").labels[:4]))
    inputs = {m: torch.from_numpy(np.array(a[:4])) for m, a in data.split("test").arrays.items()}
    loss = lambda t: torch.nn.functional.cross_entropy(model({**inputs, "text": t}).logits, y, reduction="sum")
    attacked = pgd(loss, x, pgd_settings("sequence", eps=0.3, steps=3, step_size=0.1, random_start=False))
    assert torch.equal(attacked[..., 0], x[..., 0]) and torch.equal(attacked[~real], x[~real])
    assert (attacked[real] - x[real]).abs().max() == pytest.approx(0.3)
    # a random start larger than the mask's 0.5 threshold: robustness keeps mask and padding (real_steps)
    wide = pgd_settings("sequence", eps=2.0, steps=2, step_size=0.5, random_start=True)
    raw = pgd(lambda t: loss(real_steps(t, x)), x, wide, torch.Generator().manual_seed(0))
    assert not torch.equal(raw[..., 0], x[..., 0])  # what pgd alone does to the mask
    kept = real_steps(raw, x)
    assert torch.equal(kept[..., 0], x[..., 0]) and torch.equal(kept[~real], x[~real])
    assert (kept[real] - x[real]).abs().max() <= 2.0 + 1e-6
    noisy = CORRUPTIONS["gaussian"].apply(x, 1.0, data.specs["text"], None, torch.Generator().manual_seed(0))
    assert torch.equal(noisy[..., 0], x[..., 0]) and torch.equal(noisy[~real], x[~real])
    assert not torch.equal(noisy[real], x[real])


def test_sequence_encoders_are_checked_against_the_kind(prepared):
    from mmlab_cli.errors import MmlabError
    from mmlab_cli.models.encoders import create_encoder

    spec = PreparedDataset(prepared[0] / "out").specs["visual"]
    with pytest.raises(MmlabError, match="encoder 'small_cnn' cannot read a sequence modality"):
        create_encoder("small_cnn", spec, 8)
    with pytest.raises(MmlabError, match="multiple of 4"):
        create_encoder("transformer", spec, 6)
    assert create_encoder("mlp", spec, 8)(torch.zeros(2, 8, 372)).shape == (2, 8)


def test_no_context_keeps_the_punchline_only(prepared):
    root, _, _, language, _, embeddings = prepared
    manifest, _, _ = prepare_ur_funny(root / "src", root / "punchline", max_length=8, context=False)
    assert manifest["preprocessing"]["context"] is False
    text = np.load(root / "punchline" / "train" / "text.npy")
    for row in range(4):
        words = language[f"seg{row}"]["punchline_embedding_indexes"]
        assert text[row, :, 0].sum() == len(words) and np.allclose(text[row, :len(words), 1:], embeddings[words])
