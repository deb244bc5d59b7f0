"""CLIP ViT-B/32 extractor: every official weights format loads with every image-tower key used;
preprocessing; determinism; the image tower alone, built on the meta device when weights are given,
equals the whole open_clip model it replaced. Files are generated here in each format from a seeded
random whole CLIP (both towers, as OpenAI ships it; no downloads)."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch

from extractors import EXTRACTORS
from extractors.clip import ClipExtractor
from pipeline.core.provenance import sha256_file, weights_record
from pipeline.nets.checkpoints import WeightsError
from pipeline.nets.clip import IMAGE_MEAN, IMAGE_STD, clip_vit_b_32


class _OpenAIJit(torch.nn.Module):
    """Holds CLIP's tensors under OpenAI's names plus the three integer buffers its JIT archive has."""

    def __init__(self, clip):
        super().__init__()
        for name, child in clip.named_children():
            setattr(self, name, child)
        for name in ("positional_embedding", "text_projection", "logit_scale"):
            setattr(self, name, getattr(clip, name))
        self.register_buffer("input_resolution", torch.tensor(224))
        self.register_buffer("context_length", torch.tensor(77))
        self.register_buffer("vocab_size", torch.tensor(49408))

    def forward(self, x):
        return x * self.logit_scale


@pytest.fixture(scope="module")
def reference():
    """A 'pretrained' whole CLIP: seeded random weights, rounded to fp16 like OpenAI's release."""
    torch.manual_seed(123)
    model = clip_vit_b_32()
    return {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def files(reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("clipw")
    out = {}
    # 1. OpenAI TorchScript archive ViT-B-32.pt (clip.load(jit=True)): fp16, integer buffers
    holder = clip_vit_b_32()
    holder.load_state_dict({k: v.float() for k, v in reference.items()})
    jit = torch.jit.trace(_OpenAIJit(holder.half()), torch.ones(1, dtype=torch.half), check_trace=False)
    out["openai_jit"] = root / "ViT-B-32.pt"
    jit.save(str(out["openai_jit"]))
    # 2. OpenAI state dict (clip.load(jit=False) then torch.save(model.state_dict()))
    out["openai_state_dict"] = root / "ViT-B-32-state.pt"
    torch.save(reference, out["openai_state_dict"])
    # 3. open_clip hub file: fp32 state dict in a .bin, and the same as .safetensors
    out["open_clip_bin"] = root / "open_clip_pytorch_model.bin"
    torch.save({k: v.float() for k, v in reference.items()}, out["open_clip_bin"])
    from safetensors.torch import save_file

    out["open_clip_safetensors"] = root / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.items()}, str(out["open_clip_safetensors"]))
    # 4. open_clip training checkpoint (DDP): {"epoch", "name", "state_dict": {"module.*"}, "optimizer"}
    out["open_clip_train"] = root / "epoch_3.pt"
    torch.save(
        {"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in reference.items()},
         "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0]}]}},
        out["open_clip_train"],
    )
    return out


@pytest.mark.slow  # ~150M-parameter files in five formats
@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated; OpenAI's file is TorchScript
@pytest.mark.parametrize(
    "fmt", ["openai_jit", "openai_state_dict", "open_clip_bin", "open_clip_safetensors", "open_clip_train"]
)
def test_every_format_loads_every_key(fmt, files, reference):
    if fmt == "openai_jit":
        assert any("/code/" in n for n in zipfile.ZipFile(files[fmt]).namelist())  # really TorchScript
    ex = ClipExtractor()
    model = ex.build_loaded(str(files[fmt]))  # on the meta device, then the file's tensors assigned
    loaded = model.state_dict()
    image_tower = {k: v for k, v in reference.items() if k.startswith("visual.")}
    assert set(loaded) == set(image_tower) and len(image_tower) < len(reference)  # the text tower is not built
    for key, tensor in image_tower.items():
        assert torch.equal(loaded[key].half(), tensor), key


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_formats_give_identical_features(files):
    ex = ClipExtractor()
    x = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8)
    feats = []
    for fmt in ("openai_jit", "open_clip_train"):
        model = ex.build_loaded(str(files[fmt]))
        with torch.inference_mode():
            feats.append(ex.embed(model.eval(), ex.preprocess(x)))
    assert feats[0].shape == (2, 512)
    assert torch.equal(feats[0], feats[1])


@pytest.mark.slow
def test_bad_weights_name_the_file_and_keys(files, reference, tmp_path):
    broken = dict(reference)
    del broken["visual.proj"]
    broken["visual.extra"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pt")
    ex = ClipExtractor()
    with pytest.raises(WeightsError, match=r"broken\.pt.*missing keys \[visual\.proj\].*unexpected keys \[visual\.extra\]"):
        ex.load_weights(ex.build_model(), str(tmp_path / "broken.pt"))
    with pytest.raises(WeightsError, match=r"broken\.pt.*missing keys \[visual\.proj\]"):
        ex.build_loaded(str(tmp_path / "broken.pt"))  # never a model with a tensor left on the meta device
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pt: not a readable torch checkpoint"):
        ex.load_weights(ex.build_model(), str(tmp_path / "junk.pt"))
    digest = sha256_file(files["openai_state_dict"])
    assert weights_record(str(files["openai_state_dict"]), digest) == digest
    with pytest.raises(ValueError, match="does not match the expected"):
        weights_record(str(files["openai_state_dict"]), "0" * 64)


def test_quickgelu_and_registry():
    ex = EXTRACTORS.get("clip")(EXTRACTORS.get("clip").Config())
    model = ex.build_model()
    act = model.visual.transformer.resblocks[0].mlp.gelu
    assert type(act).__name__ == "QuickGELU"  # OpenAI weights need it; plain 'ViT-B-32' has nn.GELU
    assert ex.dim == 512


def test_preprocessing_variants():
    x = torch.full((1, 224, 224, 3), 128, dtype=torch.uint8)
    hero = ClipExtractor(ClipExtractor.Config(preprocess="hero")).preprocess(x)
    openai = ClipExtractor(ClipExtractor.Config(preprocess="openai")).preprocess(x)
    expect = (128 / 255 - np.array(IMAGE_MEAN)) / np.array(IMAGE_STD)
    assert hero.shape == (1, 3, 224, 224)
    np.testing.assert_allclose(openai[0, :, 0, 0].numpy(), expect, rtol=1e-6)
    np.testing.assert_allclose(
        hero[0, :, 0, 0].numpy(), (128 / 255 - np.array(IMAGE_MEAN)) / (np.array(IMAGE_STD) + 1e-8), rtol=1e-6
    )
    assert ClipExtractor(ClipExtractor.Config(preprocess="openai")).protocol().interpolation == "bicubic"
    p = ClipExtractor(ClipExtractor.Config(clip_len=2)).protocol()
    assert (p.rule, p.rate, p.hero_short_video) == ("fps_filter", 0.5, True)
    p = ClipExtractor(ClipExtractor.Config(sampling="every_n")).protocol()
    assert (p.rule, p.every_n, p.hero_short_video) == ("every_n", 8, False)


def test_random_init_is_seeded_and_features_deterministic():
    x = torch.randint(0, 256, (3, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ex = ClipExtractor()
    with torch.inference_mode():
        a = ex.embed(ex.build_model(), ex.preprocess(x))
        b = ex.embed(ex.build_model(), ex.preprocess(x))
    assert torch.equal(a, b)


def test_image_tower_equals_the_whole_open_clip_model():
    """The seeded random init and the features of the image tower alone are byte-identical to those of
    the whole open_clip model the extractor built before (same seed, `encode_image`)."""
    ex = ClipExtractor(ClipExtractor.Config(seed=7))
    tower = ex.build_model()
    torch.manual_seed(7)
    whole = clip_vit_b_32().eval()
    expected = {k: v for k, v in whole.state_dict().items() if k.startswith("visual.")}
    got = tower.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    x = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(ex.embed(tower, ex.preprocess(x)), whole.encode_image(ex.preprocess(x)))


def test_loaded_weights_skip_the_random_init_and_equal_the_old_path(tmp_path):
    """With weights (an OpenAI-format state dict: whole CLIP, fp16), `build_loaded` builds on the meta
    device, so nothing is initialised, and gives the features the whole open_clip model gives."""
    torch.manual_seed(3)
    whole = clip_vit_b_32().eval()
    state = {k: v.half() if v.is_floating_point() else v for k, v in whole.state_dict().items()}
    torch.save(state, tmp_path / "ViT-B-32.pt")
    whole.load_state_dict({k: v.float() for k, v in state.items()})

    ex = ClipExtractor()
    calls = []
    handle = torch.nn.modules.module.register_module_parameter_registration_hook(
        lambda module, name, param: calls.append(param.device.type))
    try:
        model = ex.build_loaded(str(tmp_path / "ViT-B-32.pt")).eval()
    finally:
        handle.remove()
    n = len(list(model.parameters()))
    assert calls[:n] == ["meta"] * n  # every parameter was created on the meta device: no init paid
    assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    x = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert torch.equal(ex.embed(model, ex.preprocess(x)), whole.encode_image(ex.preprocess(x)))
