"""pipeline/nets/clip.py: the constants and tokenizer every CLIP user relied on, and each official
weights layout read back to exactly the model's keys. Files are written here from a tiny seeded CLIP."""

from __future__ import annotations

import zipfile

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from safetensors.torch import save_file

from pipeline.nets.checkpoints import WeightsError, check_state_dict
from pipeline.nets.clip import (
    CONTEXT_LENGTH,
    EOT_ID,
    IMAGE_MEAN,
    IMAGE_STD,
    OPENAI_METADATA_KEYS,
    SOT_ID,
    VOCAB_SIZE,
    bpe_tokenizer,
    fit_to_model,
    read_clip_state_dict,
    strip_openai_metadata,
    text_ids,
    without_image_tower,
)

# -- constants and tokenizer ------------------------------------------------------------------------


def test_constants_are_openai_clips():
    tok = bpe_tokenizer()
    assert (SOT_ID, EOT_ID) == (tok.sot_token_id, tok.eot_token_id) == (49406, 49407)  # MESM, GLSCL
    assert VOCAB_SIZE == len(tok.encoder) == CLIPTextCfg().vocab_size == 49408
    assert CONTEXT_LENGTH == CLIPTextCfg().context_length == 77
    assert IMAGE_MEAN == open_clip.OPENAI_DATASET_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert IMAGE_STD == open_clip.OPENAI_DATASET_STD == (0.26862954, 0.26130258, 0.27577711)


def test_tokenizer_is_built_once_and_frames_ids_like_open_clip():
    assert bpe_tokenizer() is bpe_tokenizer()
    for text in ("a dog", "A person opens the door, then sits down!", "café crème brûlée 123"):
        ids = text_ids(text, CONTEXT_LENGTH)
        assert ids == open_clip.tokenize([text])[0][: len(ids)].tolist()  # open_clip's own framing
        assert ids[1:-1] == bpe_tokenizer().encode(text)
    ids = text_ids("a red circle moves to the left", 6)
    assert ids == [SOT_ID, *bpe_tokenizer().encode("a red circle moves")[:4], EOT_ID] and len(ids) == 6
    assert text_ids("a dog", 4) == [SOT_ID, 320, 1929, EOT_ID]


# -- weights files ----------------------------------------------------------------------------------


def tiny_clip(seed: int, with_visual: bool = True) -> CLIP:
    torch.manual_seed(seed)
    model = CLIP(embed_dim=16,
                 vision_cfg=CLIPVisionCfg(layers=1, width=64, patch_size=16, image_size=32),
                 text_cfg=CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
                 quick_gelu=True)
    if not with_visual:
        model.visual = None
    return model


class _OpenAIArchive(torch.nn.Module):
    """CLIP's modules under OpenAI's names plus the integer buffers OpenAI's TorchScript file keeps."""

    def __init__(self, clip: CLIP):
        super().__init__()
        for name, child in clip.named_children():
            setattr(self, name, child)
        for name in ("positional_embedding", "text_projection", "logit_scale"):
            setattr(self, name, getattr(clip, name))
        for name, value in zip(OPENAI_METADATA_KEYS, (32, 8, 64), strict=True):
            self.register_buffer(name, torch.tensor(value))

    def forward(self, x):
        return x * self.logit_scale


@pytest.fixture(scope="module")
def released():
    """A 'pretrained' tiny CLIP in fp16, as OpenAI's release."""
    return {k: v.half() for k, v in tiny_clip(seed=1).state_dict().items()}


def write_layout(layout: str, state: dict, root) -> str:
    """`state` in one of the official containers; returns the path."""
    if layout == "openai_torchscript":  # clip.load(jit=True)'s ViT-B-32.pt
        holder = tiny_clip(seed=2)
        holder.load_state_dict(state)
        archive = torch.jit.trace(_OpenAIArchive(holder.half()), torch.ones(1, dtype=torch.half), check_trace=False)
        path = root / "ViT-B-32.pt"
        archive.save(str(path))
    elif layout == "openai_state_dict":  # clip.load(jit=False) then torch.save(model.state_dict())
        path = root / "ViT-B-32-state.pt"
        meta = {k: torch.tensor(v) for k, v in zip(OPENAI_METADATA_KEYS, (32, 8, 64), strict=True)}
        torch.save({**state, **meta}, path)
    elif layout == "open_clip_bin":  # open_clip_pytorch_model.bin: fp32, logit_scale of shape (1,)
        path = root / "open_clip_pytorch_model.bin"
        torch.save({**{k: v.float() for k, v in state.items()}, "logit_scale": state["logit_scale"].reshape(1)}, path)
    elif layout == "open_clip_safetensors":
        path = root / "open_clip_model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif layout == "open_clip_train":  # a DDP training checkpoint
        path = root / "epoch_3.pt"
        torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in state.items()},
                    "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0]}]}}, path)
    return str(path)


LAYOUTS = ["openai_torchscript", "openai_state_dict", "open_clip_bin", "open_clip_safetensors", "open_clip_train"]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated; OpenAI's file is TorchScript
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_to_exactly_the_models_keys(layout, released, tmp_path):
    path = write_layout(layout, released, tmp_path)
    if layout == "openai_torchscript":
        assert any("/code/" in n for n in zipfile.ZipFile(path).namelist())  # really TorchScript
    state = read_clip_state_dict(path)
    model = tiny_clip(seed=3)
    assert set(state) == set(model.state_dict())  # wrappers, prefixes and integer entries gone
    fitted = fit_to_model(state, model)
    assert all(v.dtype == torch.float32 for v in fitted.values()) and fitted["logit_scale"].shape == ()
    check_state_dict(model, fitted, "file")
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor.half(), released[key]), key


def test_a_text_only_clip_loads_without_the_image_tower(released, tmp_path):
    state = read_clip_state_dict(write_layout("openai_state_dict", released, tmp_path))
    text_only = tiny_clip(seed=3, with_visual=False)
    with pytest.raises(WeightsError, match=r"file: .*unexpected keys \[visual\."):
        check_state_dict(text_only, fit_to_model(state, text_only), "file")
    check_state_dict(text_only, fit_to_model(without_image_tower(state), text_only), "file")
    assert torch.equal(text_only.ln_final.weight.half(), released["ln_final.weight"])


def test_metadata_stripping_and_fitting_leave_the_rest_alone():
    state = {"input_resolution": torch.tensor(224), "context_length": torch.tensor(77),
             "vocab_size": torch.tensor(49408), "ln_final.weight": torch.ones(2), "extra": torch.ones(3).half()}
    assert set(strip_openai_metadata(state)) == {"ln_final.weight", "extra"}
    model = torch.nn.Module()
    model.logit_scale = torch.nn.Parameter(torch.tensor(1.0))
    fitted = fit_to_model({"logit_scale": torch.tensor([2.0]).half(), "extra": state["extra"]}, model)
    assert fitted["logit_scale"].shape == () and fitted["logit_scale"].dtype == torch.float32
    assert fitted["extra"] is state["extra"]  # not the model's: left for the key check to report


def test_unreadable_files_name_the_file(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pt: not a readable torch checkpoint"):
        read_clip_state_dict(str(tmp_path / "junk.pt"))
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(WeightsError, match="junk.safetensors: not a readable safetensors file"):
        read_clip_state_dict(str(tmp_path / "junk.safetensors"))
