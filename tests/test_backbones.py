"""Pretrained backbones from local files (mmlab_cli/models/backbones.py, pretrained.py): torchvision and timm models
by name with a local state dict, Hugging Face models from a local directory, `freeze`; nothing is downloaded (the
weights are random ones saved into tmp_path, HF_HUB_OFFLINE=1)."""

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from conftest import tiny_config
from mmlab_cli.data.dataset import PreparedDataset
from mmlab_cli.data.format import ModalitySpec
from mmlab_cli.engine.fit import build_optimizer
from mmlab_cli.engine.rundir import build_model
from mmlab_cli.errors import MmlabError
from mmlab_cli.main import app
from mmlab_cli.models.fusion import LateFusion
from mmlab_cli.models.pretrained import freeze, init_pretrained

RGB = ModalitySpec((3, 32, 32), "float32", "image")
SPEC = ModalitySpec((1, 32, 32), "float32", "spectrogram")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _model(encoder: str, spec=RGB, **kw) -> LateFusion:
    return LateFusion({"image": spec}, 3, encoder=encoder, dim=8, **kw).eval()


@pytest.mark.slow
@pytest.mark.parametrize("name, build", [
    ("torchvision:mobilenet_v3_small", lambda: __import__("torchvision").models.get_model("mobilenet_v3_small")),
    ("timm:test_efficientnet", lambda: __import__("timm").create_model("test_efficientnet", pretrained=False)),
])
def test_a_local_state_dict_initialises_all_but_the_classifier(tmp_path, name, build):
    torch.manual_seed(1)
    reference = build().eval()  # stands in for a downloaded checkpoint: its classifier included
    torch.save(reference.state_dict(), tmp_path / "weights.pth")
    model = _model(name)
    init_pretrained(model, {"image": str(tmp_path / "weights.pth")})
    backbone = model.encoders["image"][1]
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():  # the features the reference feeds its classifier, projected to the embedding size
        features = reference.forward_head(reference.forward_features(x), pre_logits=True) if name.startswith("timm") \
            else nn.Sequential(*list(reference.children())[:-1], nn.Flatten(), reference.classifier[:-1])(x)
        torch.testing.assert_close(backbone(x), backbone.proj(features))
    grey = _model(name, SPEC)  # a 1-channel modality is repeated to RGB
    init_pretrained(grey, {"image": str(tmp_path / "weights.pth")})
    with torch.no_grad():
        torch.testing.assert_close(grey.encoders["image"][1](x[:, :1]), grey.encoders["image"][1](x[:, :1].repeat(1, 3, 1, 1)))


def test_a_pickled_model_or_another_architecture_is_one_line(tmp_path, tiny_synthetic):
    from torchvision.models import resnet18

    torch.save(resnet18(), tmp_path / "model.pt")  # the whole model pickled, not its state dict
    torch.save(resnet18().state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(MmlabError, match=r"model.pt: not a state dict of tensors \(UnpicklingError\); save one with "
                                         r"torch.save\(model.state_dict\(\), FILE\)"):
        init_pretrained(_model("torchvision:mobilenet_v3_small"), {"image": str(tmp_path / "model.pt")})
    with pytest.raises(MmlabError, match=r"resnet18.pth: not a torchvision mobilenet_v3_small state dict \(\d+ "
                                         r"tensors missing, \d+ unexpected; first: features.0.0.weight\)"):
        init_pretrained(_model("torchvision:mobilenet_v3_small"), {"image": str(tmp_path / "resnet18.pth")})
    result = CliRunner().invoke(app, ["train", "--data", str(tiny_synthetic), "--modalities", "image,audio",
                                      "--encoder", "image=torchvision:resnet18,audio=tiny_cnn", "--embed-dim", "8",
                                      "--epochs", "1", "--pretrained", f"image={tmp_path / 'model.pt'}",
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    with pytest.raises(MmlabError, match="no such torchvision classification model"):
        _model("torchvision:resnet_nope")


def _saved_hf(tmp_path, config):
    from transformers import AutoModel

    torch.manual_seed(2)
    model = AutoModel.from_config(config)
    model.save_pretrained(tmp_path / "hf")
    return model.eval(), tmp_path / "hf"


@pytest.mark.slow
def test_a_hugging_face_vision_model_from_a_directory(tmp_path):
    from transformers import ViTConfig

    reference, path = _saved_hf(tmp_path, ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=32, image_size=32, patch_size=8))
    model = _model(f"hf:{path}", SPEC)
    init_pretrained(model, {})  # the directory's own weights
    x = torch.rand(2, 1, 32, 32)
    backbone = model.encoders["image"][1]
    with torch.no_grad():
        hidden = reference(pixel_values=x.repeat(1, 3, 1, 1)).last_hidden_state.mean(1)
        torch.testing.assert_close(backbone(x), backbone.proj(hidden))
    with pytest.raises(MmlabError, match=r"cannot read a features modality \(it reads image, spectrogram\)"):
        LateFusion({"x": ModalitySpec((400,), "float32", "features")}, 3, encoder=f"hf:{path}", dim=8)
    with pytest.raises(MmlabError, match=r"reads 32x32 images \(image_size in its config.json\), this modality is "
                                         r"16x16"):
        _model(f"hf:{path}", ModalitySpec((1, 16, 16), "float32", "image"))
    with pytest.raises(MmlabError, match=r"config.json: missing; encoder hf:DIR takes a local transformers model"):
        _model(f"hf:{tmp_path / 'nothing'}")


@pytest.mark.parametrize("kind", ["wav2vec2", "ast"])
def test_a_hugging_face_audio_model_reads_waveforms_or_spectrograms(tmp_path, kind):
    from transformers import ASTConfig, Wav2Vec2Config

    small = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    if kind == "wav2vec2":
        config = Wav2Vec2Config(**small, conv_dim=(8, 8), conv_stride=(4, 4), conv_kernel=(8, 8),
                                num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, mask_time_prob=0.0)
        spec, x = ModalitySpec((400,), "float32", "features"), torch.randn(2, 400)
        reference_input = x
    else:
        config = ASTConfig(**small, num_mel_bins=16, max_length=24, patch_size=8, frequency_stride=8, time_stride=8)
        spec, x = ModalitySpec((1, 16, 24), "float32", "spectrogram"), torch.randn(2, 1, 16, 24)
        reference_input = x[:, 0].transpose(1, 2)
    reference, path = _saved_hf(tmp_path, config)
    model = LateFusion({"audio": spec}, 3, encoder=f"hf:{path}", dim=8).eval()
    init_pretrained(model, {})
    backbone = model.encoders["audio"][1]
    with torch.no_grad():
        hidden = reference(input_values=reference_input).last_hidden_state.mean(1)
        torch.testing.assert_close(backbone(x), backbone.proj(hidden))


def test_freeze_fixes_the_parameters_before_a_layer_and_the_optimizer_skips_them(tiny_synthetic, tmp_path):
    cfg = tiny_config(tiny_synthetic, tmp_path / "run", encoder={"image": "torchvision:resnet18", "audio": "tiny_cnn"},
                      freeze={"image": "until:layer3", "audio": "all"})
    model = build_model(cfg, PreparedDataset(tiny_synthetic, ["image", "audio"]))
    net = model.encoders["image"][1].net
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in net.named_parameters() if n.startswith(("layer3.", "layer4."))}
    assert model.encoders["image"][1].proj.weight.requires_grad  # the new projection always trains
    assert not any(p.requires_grad for p in model.encoders["audio"].parameters())
    opt, _ = build_optimizer(cfg, model)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["audio"]["params"] == [] and len(groups["image"]["params"]) == len(trainable) + 2
    with pytest.raises(MmlabError, match=r"^freeze: image's encoder has no layer 'layer9'; its top-level layers: "
                                         r"conv1, bn1, relu, maxpool, layer1, layer2, layer3, layer4, avgpool, fc$"):
        freeze(model, {"image": "until:layer9"})
    result = CliRunner().invoke(app, ["train", "--data", str(tiny_synthetic), "--freeze", "image=some", "--out",
                                      str(tmp_path / "bad")])
    assert result.exit_code == 2 and "'freeze' has {'image': 'some'}; give all, none or until:LAYER" in result.output
