"""VGG16 fc7 extractor: torchvision and Charades two-stream checkpoints load with every key used; fc7."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from extractors._base import WeightsError
from extractors.vgg import IMAGENET_MEAN, IMAGENET_STD, VggExtractor


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(7)
    return torchvision.models.vgg16(weights=None).state_dict()


def _loaded(path, **cfg):
    """As the extract stage builds it with weights: on the meta device, then the file's tensors assigned."""
    ex = VggExtractor(VggExtractor.Config(**cfg))
    model = ex.build_loaded(str(path))
    assert not any(t.is_meta for t in model.state_dict().values())
    return ex, model.eval()


@pytest.mark.slow  # 138M-parameter files
def test_torchvision_state_dict_loads_every_key(reference, tmp_path):
    torch.save(reference, tmp_path / "vgg16-397923af.pth")
    _, model = _loaded(tmp_path / "vgg16-397923af.pth")
    loaded = model.state_dict()
    assert set(loaded) == set(reference)
    assert all(torch.equal(loaded[k], v) for k, v in reference.items())


@pytest.mark.slow
def test_charades_two_stream_checkpoint(reference, tmp_path):
    # gsig/charades-algorithms: torchvision vgg16 with classifier[6] -> 157 classes, saved as
    # {'epoch', 'arch', 'state_dict', 'mAP', 'optimizer'}; features in DataParallel when not pretrained
    state = {k.replace("features.", "features.module."): v for k, v in reference.items()}
    state["classifier.6.weight"] = torch.randn(157, 4096)
    state["classifier.6.bias"] = torch.randn(157)
    ckpt = {"epoch": 10, "arch": "vgg16", "state_dict": state, "mAP": np.float64(0.186),
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]}}
    torch.save(ckpt, tmp_path / "twostream_rgb.pth.tar")
    ex, model = _loaded(tmp_path / "twostream_rgb.pth.tar")
    assert model.classifier[6].out_features == 157
    loaded = model.state_dict()
    assert torch.equal(loaded["features.0.weight"], reference["features.0.weight"])
    assert torch.equal(loaded["classifier.6.bias"], state["classifier.6.bias"])
    assert set(loaded) == {k.replace("features.module.", "features.") for k in state}
    with pytest.raises(WeightsError, match="classifier.6 has 157 outputs"):
        _loaded(tmp_path / "twostream_rgb.pth.tar", num_classes=1000)


def test_fc7_is_the_post_relu_second_fc_layer():
    ex = VggExtractor()
    model = ex.build_model()
    x = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8)
    with torch.inference_mode():
        feats = ex.embed(model, ex.preprocess(x))
        pre = VggExtractor(VggExtractor.Config(fc7="pre_relu")).embed(model, ex.preprocess(x))
        h = torch.flatten(model.avgpool(model.features(ex.preprocess(x))), 1)
        manual = torch.relu(model.classifier[3](torch.relu(model.classifier[0](h))))
    assert feats.shape == (2, 4096) and (feats >= 0).all()
    torch.testing.assert_close(feats, manual)
    torch.testing.assert_close(torch.relu(pre), feats)
    p = ex.protocol()
    assert (p.rule, p.rate, p.short_side, p.crop) == ("fps_filter", 8.0, 256, 224)
    y = ex.preprocess(torch.full((1, 2, 2, 3), 255, dtype=torch.uint8))
    np.testing.assert_allclose(y[0, :, 0, 0].numpy(), (1 - np.array(IMAGENET_MEAN)) / IMAGENET_STD, rtol=1e-6)


def test_unreadable_file(tmp_path):
    (tmp_path / "x.pth").write_bytes(b"nope")
    with pytest.raises(WeightsError, match="x.pth: not a readable torch checkpoint"):
        _loaded(tmp_path / "x.pth")
