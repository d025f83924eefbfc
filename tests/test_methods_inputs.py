"""Augmentation (against torchvision, sharded like the loader), encoders: text (transformers), ResNet18
initialisation, frames, the strided stem, per-modality encoder choice."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from mmlab_cli.data.format import ModalitySpec, write_dataset
from mmlab_cli.methods.augment import BatchAugment, color_jitter, crop_flip, spec_masks
from mmlab_cli.models.encoders import MaxPool2x2, create_encoder
from mmlab_cli.models.fusion import LateFusion
from mmlab_cli.models.pretrained import init_pretrained

IMAGE = ModalitySpec((3, 12, 12), "uint8", "image", 0.5, 0.25)
FRAMES = ModalitySpec((2, 3, 12, 12), "uint8", "frames", 0.5, 0.25)
SPEC = ModalitySpec((1, 20, 10), "float32", "spectrogram", -3.0, 2.0)


def test_color_jitter_matches_torchvision_per_image():
    x = torch.rand(4, 3, 8, 8)
    b, c, s = torch.tensor([0.6, 1.0, 1.3, 0.9]), torch.tensor([1.4, 0.7, 1.0, 1.1]), torch.tensor([0.8, 1.2, 0.6, 1.0])
    h = torch.tensor([0.1, -0.05, 0.0, 0.07])
    got = color_jitter(x, b, c, s, h)
    for i in range(4):
        ref = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(
            x[i], b[i].item()), c[i].item()), s[i].item()), h[i].item())
        assert torch.allclose(got[i], ref, atol=1e-5), i
    gray = torch.rand(2, 1, 8, 8)  # saturation and hue leave 1-channel images alone, as in torchvision
    ref = TF.adjust_contrast(TF.adjust_brightness(gray[0], 1.2), 0.8)
    assert torch.allclose(color_jitter(gray, *(torch.tensor([v, v]) for v in (1.2, 0.8, 0.5, 0.1)))[0], ref, atol=1e-6)


def test_color_jitter_reproduces_the_outputs_of_torchvisions_private_hsv_helpers():
    """tests/assets/color_jitter_reference.npz: color_jitter's outputs when it used torchvision's private
    _rgb_to_hsv/_hsv_to_rgb, on images with grey, black, white pixels and channel ties, hue shifts of +-0.1."""
    ref = np.load(Path(__file__).parent / "assets" / "color_jitter_reference.npz")
    got = color_jitter(torch.from_numpy(ref["x"]), *torch.from_numpy(ref["factors"]))
    torch.testing.assert_close(got, torch.from_numpy(ref["out"]), atol=2e-6, rtol=0)


def test_crop_flip_identity_and_exact_flip():
    x = torch.rand(3, 2, 9, 7)
    full = torch.tensor([[0.5, 0.5, 1.0, 1.0]] * 3)
    assert torch.allclose(crop_flip(x, full, None), x, atol=1e-5)
    flip = torch.tensor([True, False, True])
    expected = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    assert torch.allclose(crop_flip(x, full, flip), expected, atol=1e-5)  # folded into the crop's grid
    assert torch.equal(crop_flip(x, None, flip), expected)
    # the right half of the image, stretched: its right-most column is the image's right-most column
    half = torch.tensor([[0.75, 0.5, 0.5, 1.0]] * 3)
    ramp = torch.arange(8.0).repeat(3, 1, 4, 1)  # value = column index
    out = crop_flip(ramp, half, None)
    assert out[..., -1].allclose(torch.full_like(out[..., -1], 7.0), atol=0.3) and out[..., 0].min() >= 3.5


def test_spec_masks_and_fill():
    x = torch.zeros(2, 1, 6, 5)
    freq = torch.tensor([[[1, 2], [0, 0]], [[0, 0], [0, 0]]])  # sample 0: bins 1-2 masked
    time = torch.tensor([[[0, 0], [0, 0]], [[4, 1], [0, 1]]])  # sample 1: frames 0 and 4 masked
    out = spec_masks(x, freq, time, fill=7.0)
    assert (out[0, 0, 1:3] == 7).all() and (out[0, 0, [0, 3, 4, 5]] == 0).all()
    assert (out[1, 0, :, [0, 4]] == 7).all() and (out[1, 0, :, 1:4] == 0).all()


def test_batch_augment_is_seeded_and_sharded_like_the_loader():
    specs = {"image": IMAGE, "visual": FRAMES, "audio": SPEC, "text": ModalitySpec((2, 4), "int64", "text_tokens")}
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(8, 3, 12, 12, generator=g), "visual": torch.rand(8, 2, 3, 12, 12, generator=g),
             "audio": torch.randn(8, 1, 20, 10, generator=g), "text": torch.randint(0, 9, (8, 2, 4), generator=g)}
    names = ["jitter", "crop", "flip", "specaugment"]
    single = BatchAugment(names, specs, seed=3, batch_size=8)(batch, epoch=1, step=2)
    assert torch.equal(single["text"], batch["text"])  # text is never augmented
    assert not torch.equal(single["image"], batch["image"]) and not torch.equal(single["audio"], batch["audio"])
    assert ((single["audio"] == SPEC.mean) | (single["audio"] == batch["audio"])).all()
    again = BatchAugment(names, specs, seed=3, batch_size=8)(batch, epoch=1, step=2)
    assert all(torch.equal(single[m], again[m]) for m in batch)
    # two ranks, each with every 2nd sample of the global batch, augment exactly as one process does
    for rank in (0, 1):
        local = {m: v[rank::2] for m, v in batch.items()}
        out = BatchAugment(names, specs, seed=3, batch_size=8, rank=rank, world=2)(local, epoch=1, step=2)
        assert all(torch.allclose(out[m], single[m][rank::2], atol=1e-6) for m in batch)
    other = BatchAugment(names, specs, seed=3, batch_size=8)(batch, epoch=1, step=3)
    assert not torch.equal(other["image"], single["image"])
    assert not BatchAugment(["specaugment"], {"image": IMAGE}, 0, 8)  # nothing it applies to


def test_augmentation_runs_in_training_only(tiny_synthetic, tmp_path, monkeypatch):
    from conftest import tiny_config
    from mmlab_cli.engine import fit

    calls = []
    original = fit.BatchAugment.__call__
    monkeypatch.setattr(fit.BatchAugment, "__call__", lambda self, *a: calls.append(a[1:]) or original(self, *a))
    fit.train(tiny_config(tiny_synthetic, tmp_path / "aug", epochs=1, encoder="mlp", augment=["jitter", "flip"]))
    steps = len(fit.BatchLoader(fit.PreparedDataset(tiny_synthetic).split("train"), 16, torch.device("cpu"),
                                drop_last=True))
    assert calls == [(0, i) for i in range(steps)]  # one call per training step; none for val/test


def test_frames_encoder_is_per_frame_then_temporal_mean():
    torch.manual_seed(0)
    enc = create_encoder("tiny_cnn", FRAMES, 8).eval()
    x = torch.rand(3, 2, 3, 12, 12)
    with torch.no_grad():
        per_frame = torch.stack([enc[1].frame_encoder(enc[0](x[:, k])) for k in range(2)], 1).mean(1)
        assert torch.allclose(enc(x), per_frame, atol=1e-6)


def test_strided_cnn_is_tiny_cnn_with_a_stride_2_stem():
    torch.manual_seed(0)
    tiny, strided = create_encoder("tiny_cnn", SPEC, 8), create_encoder("strided_cnn", SPEC, 8)
    strided.load_state_dict(tiny.state_dict())  # same parameters, only the first convolution's stride differs
    x = torch.randn(2, 1, 20, 10)
    with torch.no_grad():
        torch.testing.assert_close(strided[1][0](x), tiny[1][0](x)[..., ::2, ::2])
        assert strided(x).shape == (2, 8)


def test_max_pool_2x2_is_bit_identical_to_max_pooling_ties_odd_sizes_and_second_derivatives():
    """The gathered maxima give max pooling's outputs and gradients bit for bit: ties (a constant positive block,
    post-ReLU zeros, NaN) go to the same element (a different tie rule would move a gradient), odd sizes drop the
    last row and column alike, and the second derivative (Hessian analyses) agrees."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 9, 7, generator=g).relu()
    x[0, 0, :4, :4] = 1.5
    x[1, 2, 2, 3] = float("nan")
    x.requires_grad_()
    fast, ref = MaxPool2x2(), torch.nn.MaxPool2d(2)
    out, expected = fast(x), ref(x)
    assert out.shape == expected.shape == (3, 4, 4, 3) and out[1, 2, 1, 1].isnan()
    assert torch.equal(out.nan_to_num(-1.0), expected.nan_to_num(-1.0))
    w = torch.randn(expected.shape, generator=g)
    grads = [torch.autograd.grad((pool(x).nan_to_num(0.0) * w).sum(), x, create_graph=True)[0] for pool in (fast, ref)]
    assert torch.equal(grads[0], grads[1]) and grads[0][0, 0, :4, :4].count_nonzero() == 4  # one per 2x2 block
    v = torch.randn(x.shape, generator=g)
    second = [torch.autograd.grad((gr * v).sum() + (pool(x).nan_to_num(0.0) ** 2).sum(), x)[0]
              for gr, pool in zip(grads, (fast, ref))]
    assert torch.equal(second[0], second[1])
    assert fast(x.detach().contiguous(memory_format=torch.channels_last)).shape == expected.shape  # the plain path


def test_tiny_cnn_trains_bit_identically_with_either_max_pooling(monkeypatch):
    """Steps of tiny_cnn (its two 2x2 poolings) with MaxPool2x2 and with nn.MaxPool2d end at equal weights."""
    weights = []
    for forward in (MaxPool2x2.forward, torch.nn.MaxPool2d.forward):
        monkeypatch.setattr(MaxPool2x2, "forward", forward)
        torch.manual_seed(0)
        enc = create_encoder("tiny_cnn", SPEC, 8)
        opt = torch.optim.SGD(enc.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            opt.zero_grad()
            enc(torch.randn(6, 1, 20, 10, generator=g)).square().mean().backward()
            opt.step()
        weights.append(enc.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_pooled_cnn_is_strided_cnn_on_the_input_averaged_over_2x2_blocks():
    torch.manual_seed(0)
    strided, pooled = create_encoder("strided_cnn", SPEC, 8).eval(), create_encoder("pooled_cnn", SPEC, 8).eval()
    pooled[1][1].load_state_dict(strided[1].state_dict())
    x = torch.randn(2, 1, 40, 24)
    blocks = (x[..., 0::2, 0::2] + x[..., 1::2, 0::2] + x[..., 0::2, 1::2] + x[..., 1::2, 1::2]) / 4
    with torch.no_grad():
        torch.testing.assert_close(pooled[1](x), strided[1](blocks))


def test_resnet18_initialised_from_a_local_torchvision_state_dict(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(1)
    reference = resnet18().state_dict()  # stands in for the ImageNet weights file
    torch.save(reference, tmp_path / "resnet18.pth")
    specs = {"image": IMAGE, "audio": ModalitySpec((1, 32, 32), "float32", "spectrogram")}
    model = LateFusion(specs, 5, encoder={"image": "resnet18", "audio": "resnet18"}, dim=8)
    init_pretrained(model, {"image": str(tmp_path / "resnet18.pth"), "audio": str(tmp_path / "resnet18.pth")})
    image, audio = model.encoders["image"][1], model.encoders["audio"][1]
    assert torch.equal(image.conv1.weight, reference["conv1.weight"])
    assert torch.equal(image.layer3[1].conv2.weight, reference["layer3.1.conv2.weight"])
    assert torch.equal(image.bn1.running_var, reference["bn1.running_var"])
    assert torch.allclose(audio.conv1.weight, reference["conv1.weight"].sum(1, keepdim=True))  # 1-channel stem
    assert image.fc.out_features == 8
    with pytest.raises(Exception, match="need a resnet18, torchvision:NAME or timm:NAME encoder"):
        init_pretrained(LateFusion(specs, 5, encoder="tiny_cnn", dim=8), {"image": str(tmp_path / "resnet18.pth")})


# ---- text: a food101-like dataset (image + [2, L] token ids / mask) and a tiny BERT ----------------------

@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("text")
    rng = np.random.default_rng(0)
    arrays, labels = {}, {}
    for split, n in (("train", 24), ("val", 6), ("test", 6)):
        y = np.arange(n) % 3
        ids = np.concatenate([np.full((n, 1), 1), (y[:, None] * 10 + rng.integers(2, 10, (n, 5))), np.zeros((n, 2))], 1)
        mask = np.concatenate([np.ones((n, 6)), np.zeros((n, 2))], 1)
        arrays[split] = {"image": rng.integers(0, 256, (n, 3, 12, 12), dtype=np.uint8),
                         "text": np.stack([ids, mask], 1).astype(np.int64)}
        labels[split] = y
    write_dataset(root / "data", dataset="tiny-food", classes=["a", "b", "c"], kinds={"image": "image", "text": "text_tokens"},
                  arrays=arrays, labels=labels, preprocessing={}, sources={})
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    config.save_pretrained(root / "bert-config-only")
    torch.manual_seed(5)
    BertModel(config).save_pretrained(root / "bert")
    return root


def test_text_encoder_trains_and_loads_back(text_data, tmp_path):
    from conftest import tiny_config
    from mmlab_cli.data.loader import BatchLoader
    from mmlab_cli.engine.evaluate import evaluate
    from mmlab_cli.engine.fit import train
    from mmlab_cli.engine.rundir import load_run

    cfg = tiny_config(text_data / "data", tmp_path / "food", modalities=["image", "text"], epochs=2, batch_size=8,
                      encoder={"image": "tiny_cnn"}, text_encoder=str(text_data / "bert"),
                      encoder_lr={"text": 0.001}, encoder_weight_decay={"text": 0.001}, optimizer="adam", lr=0.01)
    metrics = train(cfg)
    assert {"test_acc_image", "test_acc_text"} <= set(metrics)
    run = load_run(tmp_path / "food")
    test = evaluate(run.model, BatchLoader(run.dataset.split("test"), 8, torch.device("cpu")), torch.device("cpu"))
    assert test["acc"] == pytest.approx(metrics["test_acc"])
    assert run.config.encoder == {"image": "tiny_cnn"} and run.config.encoder_lr == {"text": 0.001}


def test_text_encoder_weights_come_from_the_directory(text_data):
    from transformers import BertModel

    from mmlab_cli.data.dataset import PreparedDataset

    specs = PreparedDataset(text_data / "data").specs
    saved = BertModel.from_pretrained(text_data / "bert").embeddings.word_embeddings.weight
    loaded = LateFusion(specs, 3, encoder={"image": "tiny_cnn", "text": "bert"}, dim=8, text_encoder=str(text_data / "bert"))
    assert not torch.equal(loaded.encoders["text"].backbone.embeddings.word_embeddings.weight, saved)
    init_pretrained(loaded, {})
    assert torch.equal(loaded.encoders["text"].backbone.embeddings.word_embeddings.weight, saved)
    # a config-only directory builds a random model of that shape; the text encoder needs a directory
    fresh = LateFusion(specs, 3, encoder="tiny_cnn", dim=8, text_encoder=str(text_data / "bert-config-only"))
    assert not fresh.encoders["text"].has_weights()
    x = torch.from_numpy(np.array(PreparedDataset(text_data / "data").split("train").arrays["text"][:4]))
    assert fresh.encoders["text"](x).shape == (4, 8)
    with pytest.raises(Exception, match="--text-encoder"):
        LateFusion(specs, 3, encoder="tiny_cnn", dim=8)
    with pytest.raises(Exception, match="encoder .bert. cannot read an image modality .it reads text_tokens."):
        LateFusion(specs, 3, encoder={"image": "bert", "text": "bert"}, dim=8, text_encoder=str(text_data / "bert"))
