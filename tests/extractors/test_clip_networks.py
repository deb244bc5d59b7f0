"""Snippet-level networks: parameter counts, FLOPs, every official weights format, PCA, determinism.

Weights files are generated here in exactly the official containers (same keys, shapes, nesting);
the Caffe2 SlowFast blob list is written out from the architecture independently of the mapping
under test.
"""

from __future__ import annotations

import functools
import pickle

import h5py
import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from extractors import EXTRACTORS
from extractors.c3d import PCAProjection
from extractors.slowfast import build_slowfast_r50, caffe2_key, slowfast_features
from pipeline.nets.c3d import C3D
from pipeline.nets.checkpoints import WeightsError
from pipeline.nets.i3d import InceptionI3d, build_i3d_r50, i3d_r50_features


def n_params(module: torch.nn.Module, skip: str | None = None) -> int:
    return sum(p.numel() for k, p in module.named_parameters() if not (skip and k.startswith(skip)))


@pytest.fixture(scope="module")
def slowfast_model():
    return EXTRACTORS.get("slowfast")().build_model()  # building is slow; loads overwrite every tensor


# -- parameter counts (published / reference ports) ------------------------------------------------


def test_slowfast_r50_has_34_57_m_parameters(slowfast_model):
    assert n_params(slowfast_model) == 34_566_488  # model_zoo.md: 34.57 M with the 400-way head


def test_inception_i3d_matches_piergiaj_counts():
    model = InceptionI3d(400)
    assert n_params(model) == 12_697_264
    assert n_params(model, skip="logits") == 12_287_264  # up to Mixed_5c
    model.replace_logits(157)
    assert n_params(model) == 12_448_189


def test_c3d_matches_reference_port_counts():
    model = C3D()
    assert n_params(model) == 79_991_015
    assert n_params(model, skip="fc8") == 77_995_776  # up to fc7


# -- FLOPs (meta tensors: counted, not computed) ---------------------------------------------------


def gflops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def test_flops_per_clip_match_published_figures():
    with torch.device("meta"):
        sf, i3d, c3d = build_slowfast_r50(), InceptionI3d(400).eval(), C3D().eval()
        # model_zoo.md: 65.71 GFLOPs (fvcore counts multiply-adds) for a 256x256 view
        sf256 = gflops(lambda: slowfast_features(sf, torch.empty(1, 3, 8, 256, 256), torch.empty(1, 3, 32, 256, 256)))
        assert sf256 / 2 == pytest.approx(65.71, abs=0.01)
        # Tran et al. / ActivityNet C3D: 38.5 GMACs per 16x112x112 clip
        assert gflops(lambda: c3d.features(torch.empty(1, 3, 16, 112, 112), "fc7")) / 2 == pytest.approx(38.5, abs=0.1)
        # Quo Vadis quotes ~108 GMACs for 64x224x224; the features stop before the logits
        i3d64 = gflops(lambda: i3d.extract_features(torch.empty(1, 3, 64, 224, 224))) / 2
        assert 100 < i3d64 < 115


# -- SlowFast weights -------------------------------------------------------------------------------


def caffe2_blob_shapes() -> dict[str, tuple[int, ...]]:
    """SLOWFAST_8x8_R50.pkl blob names and shapes, written out from the architecture."""
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, channels: int) -> None:
        for part in ("s", "b", "rm", "riv"):
            shapes[f"{prefix}_bn_{part}"] = (channels,)

    shapes["conv1_w"] = (64, 3, 1, 7, 7)
    bn("res_conv1", 64)
    shapes["t_conv1_w"] = (8, 3, 5, 7, 7)
    bn("t_res_conv1", 8)
    shapes["t_pool1_subsample_w"] = (16, 8, 7, 1, 1)
    bn("t_pool1_subsample", 16)
    slow_in, fast_in = 64 + 16, 8
    for stage, depth, inner_slow in ((2, 3, 64), (3, 4, 128), (4, 6, 256), (5, 3, 512)):
        inner_fast = inner_slow // 8
        for prefix, c_in, inner, kt in (("", slow_in, inner_slow, 1 if stage < 4 else 3), ("t_", fast_in, inner_fast, 3)):
            out = 4 * inner
            for i in range(depth):
                name, cin = f"{prefix}res{stage}_{i}", c_in if i == 0 else out
                if i == 0:
                    shapes[f"{name}_branch1_w"] = (out, cin, 1, 1, 1)
                    bn(f"{name}_branch1", out)
                shapes[f"{name}_branch2a_w"] = (inner, cin, kt, 1, 1)
                bn(f"{name}_branch2a", inner)
                shapes[f"{name}_branch2b_w"] = (inner, inner, 1, 3, 3)
                bn(f"{name}_branch2b", inner)
                shapes[f"{name}_branch2c_w"] = (out, inner, 1, 1, 1)
                bn(f"{name}_branch2c", out)
        fast_out = 4 * inner_fast
        if stage < 5:
            lateral = f"t_res{stage}_{depth - 1}_branch2c_bn_subsample"
            shapes[f"{lateral}_w"] = (2 * fast_out, fast_out, 7, 1, 1)
            bn(lateral, 2 * fast_out)
            slow_in = 4 * inner_slow + 2 * fast_out
        fast_in = fast_out
    shapes["pred_w"] = (400, 2304)
    shapes["pred_b"] = (400,)
    return shapes


@functools.cache
def caffe2_blobs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    blobs = {k: rng.random(s, dtype=np.float32) - 0.5 for k, s in caffe2_blob_shapes().items()}
    for k in [k for k in blobs if k.endswith("_riv")]:
        blobs[k] = blobs[k] + 1.0  # variances
    return blobs


def write_caffe2_pkl(path, drop: str | None = None, extra: dict | None = None) -> dict[str, np.ndarray]:
    blobs = dict(caffe2_blobs())
    if drop:
        del blobs[drop]
    # training state that a model-zoo pickle also carries
    blobs["conv1_w_momentum"] = np.zeros((64, 3, 1, 7, 7), np.float32)
    blobs["lr"], blobs["model_iter"] = np.float32(0.1), np.int64(196000)
    blobs.update(extra or {})
    with open(path, "wb") as fh:
        pickle.dump({"blobs": blobs}, fh, protocol=2)
    return blobs


def test_caffe2_pkl_fills_every_slowfast_tensor(tmp_path, slowfast_model):
    path = tmp_path / "SLOWFAST_8x8_R50.pkl"
    blobs = write_caffe2_pkl(path)
    model = slowfast_model
    EXTRACTORS.get("slowfast")().load_weights(model, str(path))
    state = model.state_dict()
    filled = {caffe2_key(k) for k in caffe2_blob_shapes()}
    params = {k for k in state if not k.endswith("num_batches_tracked")}
    assert filled == params  # one blob per tensor, no tensor left out
    for name in ("t_res4_5_branch2c_bn_subsample_w", "res3_0_branch1_bn_riv", "t_conv1_w", "pred_w"):
        assert torch.equal(state[caffe2_key(name)], torch.from_numpy(blobs[name]))
    assert caffe2_key("t_pool1_subsample_bn_rm") == "blocks.0.multipathway_fusion.norm.running_mean"
    assert caffe2_key("res5_2_branch2b_bn_s") == "blocks.4.multipathway_blocks.0.res_blocks.2.branch2.norm_b.weight"


@pytest.mark.parametrize("drop", ["res4_3_branch2b_bn_rm", "t_res3_3_branch2c_bn_subsample_w", "pred_b"])
def test_caffe2_gap_is_an_error(tmp_path, drop, slowfast_model):
    path = tmp_path / "gap.pkl"
    write_caffe2_pkl(path, drop=drop)
    with pytest.raises(WeightsError, match=rf"{path}.*without a blob.*{caffe2_key(drop)}"):
        EXTRACTORS.get("slowfast")().load_weights(slowfast_model, str(path))


def test_caffe2_unknown_or_misshaped_blob_is_an_error(tmp_path, slowfast_model):
    ex = EXTRACTORS.get("slowfast")()
    path = tmp_path / "extra.pkl"
    write_caffe2_pkl(path, extra={"res2_0_branch3a_w": np.zeros(3, np.float32)})
    with pytest.raises(WeightsError, match="res2_0_branch3a_w"):
        ex.load_weights(slowfast_model, str(path))
    write_caffe2_pkl(path, extra={"pred_w": np.zeros((400, 2048), np.float32)})
    with pytest.raises(WeightsError, match="wrong shape.*pred_w"):
        ex.load_weights(slowfast_model, str(path))
    with pytest.raises(KeyError):
        caffe2_key("res2_1_branch2c_bn_subsample_w")  # laterals only after a stage's last block


def test_pytorchvideo_pyth_loads_strictly(tmp_path, slowfast_model):
    ex = EXTRACTORS.get("slowfast")(EXTRACTORS.get("slowfast").Config(seed=1))
    source = ex.build_model()
    path = tmp_path / "SLOWFAST_8x8_R50.pyth"
    torch.save({"model_state": source.state_dict(), "epoch": 196}, path)
    target = slowfast_model
    EXTRACTORS.get("slowfast")().load_weights(target, str(path))
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values(), strict=True))
    state = source.state_dict()
    del state["blocks.6.proj.bias"]
    torch.save({"model_state": state}, path)
    with pytest.raises(WeightsError, match="missing keys.*proj.bias"):
        EXTRACTORS.get("slowfast")().load_weights(target, str(path))


def test_slowfast_features_are_2304_and_deterministic():
    ex = EXTRACTORS.get("slowfast")(EXTRACTORS.get("slowfast").Config(size=32))
    units = torch.randint(0, 256, (2, 32, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    outs = []
    for _ in range(2):  # two fresh seeded builds: same init, same features
        with torch.inference_mode():
            outs.append(ex.embed(ex.build_model(), ex.preprocess(units)))
    assert outs[0].shape == (2, 2304) and torch.equal(outs[0], outs[1])


# -- I3D weights ------------------------------------------------------------------------------------


def piergiaj_state(num_classes: int, seed: int) -> dict:
    """Like rgb_imagenet.pt / rgb_charades.pt: saved by PyTorch 0.3, so no num_batches_tracked."""
    torch.manual_seed(seed)
    model = InceptionI3d(400)
    if num_classes != 400:
        model.replace_logits(num_classes)
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize("num_classes", [400, 157])  # rgb_imagenet.pt, rgb_charades.pt
def test_piergiaj_checkpoints_load(tmp_path, num_classes):
    path = tmp_path / "rgb.pt"
    state = piergiaj_state(num_classes, seed=3)
    torch.save(state, path)
    ex = EXTRACTORS.get("i3d")()
    model = ex.build_model()
    ex.load_weights(model, str(path))
    assert model.logits.conv3d.out_channels == num_classes
    assert torch.equal(model.state_dict()["Mixed_5c.b3b.conv3d.weight"], state["Mixed_5c.b3b.conv3d.weight"])
    del state["Mixed_4d.b1b.bn.running_var"]
    torch.save(state, path)
    with pytest.raises(WeightsError, match="Mixed_4d.b1b.bn.running_var"):
        ex.load_weights(ex.build_model(), str(path))


def test_i3d_feature_rows_and_tf_same_padding():
    model = InceptionI3d(400).eval()
    with torch.inference_mode():
        for frames, rows in ((16, 1), (17, 2), (24, 2), (40, 4)):
            assert model.extract_features(torch.zeros(1, 3, frames, 64, 64)).shape == (1, 1024, rows)
        # TF-SAME: Conv3d_1a (k7, s2) on 224 pads (2, 3) -> 112 outputs; MaxPool4a keeps ceil(T/2)
        assert model.Conv3d_1a_7x7(torch.zeros(1, 3, 9, 224, 224)).shape == (1, 64, 5, 112, 112)


def test_i3d_r50_is_2048_d_and_loads_pyth(tmp_path):
    torch.manual_seed(0)
    model = build_i3d_r50().eval()
    with torch.inference_mode():
        assert i3d_r50_features(model, torch.zeros(1, 3, 8, 64, 64)).shape == (1, 2048)
    path = tmp_path / "I3D_8x8_R50.pyth"
    torch.save({"model_state": model.state_dict()}, path)
    ex = EXTRACTORS.get("i3d_r50")()
    target = ex.build_model()
    ex.load_weights(target, str(path))
    assert torch.equal(target.state_dict()["blocks.0.conv.weight"], model.state_dict()["blocks.0.conv.weight"])


# -- C3D weights and PCA ----------------------------------------------------------------------------


def test_c3d_pickle_loads_and_fc_layers(tmp_path):
    torch.manual_seed(5)
    source = C3D()
    path = tmp_path / "c3d.pickle"
    torch.save(source.state_dict(), path)
    ex = EXTRACTORS.get("c3d")(EXTRACTORS.get("c3d").Config(layer="fc7"))
    model = ex.build_model()
    ex.load_weights(model, str(path))
    assert torch.equal(model.net.fc7.weight, source.fc7.weight)
    state = source.state_dict()
    state["fc9.weight"] = state.pop("fc8.weight")
    torch.save(state, path)
    with pytest.raises(WeightsError, match="fc8.weight"):
        ex.load_weights(ex.build_model(), str(path))
    with pytest.raises(ValueError, match="512x1x4x4"):
        model.net.features(torch.zeros(1, 3, 32, 112, 112))  # 32 frames would flatten into 2 rows


def test_c3d_tall_window_is_mean_of_unit_features():
    ex = EXTRACTORS.get("c3d")(EXTRACTORS.get("c3d").Config(protocol="tall64"))
    model = ex.build_model()
    clip = torch.randint(0, 256, (1, 32, 112, 112, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        x = ex.preprocess(clip)
        window = ex.embed(model, x)
        units = [model.net.features(x[:, :, i : i + 16]) for i in (0, 16)]
    assert torch.allclose(window, (units[0] + units[1]) / 2, atol=1e-5)


def test_c3d_preprocess_bgr_minus_mean():
    ex = EXTRACTORS.get("c3d")(EXTRACTORS.get("c3d").Config(mean=(90, 98, 102)))  # the ports' rounded mean
    px = torch.tensor([10, 20, 30], dtype=torch.uint8).view(1, 1, 1, 1, 3)
    assert ex.preprocess(px).flatten().tolist() == [30 - 90.0, 20 - 98.0, 10 - 102.0]


def test_activitynet_pca(tmp_path):
    rng = np.random.default_rng(0)
    U, S, mean = rng.standard_normal((4096, 600)), np.linspace(10, 1, 600), rng.standard_normal(4096)
    path = tmp_path / "PCA_activitynet_v1-3.hdf5"
    with h5py.File(path, "w") as f:
        f["U"], f["S"], f["x_mean"] = U, S, mean
    x = rng.standard_normal((3, 4096)).astype(np.float32)
    pca = PCAProjection.from_file(str(path))
    assert np.allclose(pca(x), (x - mean) @ U[:, :500], atol=1e-3)
    ex = EXTRACTORS.get("c3d")(EXTRACTORS.get("c3d").Config(layer="fc7", pca=str(path)))
    assert ex.dim == 500
    model = ex.build_model()
    clip = torch.zeros(1, 16, 112, 112, 3, dtype=torch.uint8)
    with torch.inference_mode():
        x = ex.preprocess(clip)
        out = ex.embed(model, x)
        fc7 = model.net.features(x, "fc7").double().numpy()
    assert out.shape == (1, 500) and np.allclose(out.numpy(), (fc7 - mean) @ U[:, :500], atol=1e-3)
    with h5py.File(path, "w") as f:
        f["U"], f["S"] = U, S
    with pytest.raises(WeightsError, match="x_mean"):
        PCAProjection.from_file(str(path))
