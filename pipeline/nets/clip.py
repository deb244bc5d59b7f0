"""CLIP as OpenAI released it: its constants, its BPE tokenizer and its weights files.

The one place for what the CLIP frame extractor (`extractors/clip.py`), GLSCL (`models/glscl/`) and
MESM's text encoder share. The networks themselves are open_clip's, whose parameter names are
OpenAI's, so a state dict in either layout loads once its wrappers are taken off.

Weights files `read_clip_state_dict` accepts, from a local path (nothing is downloaded):
- OpenAI's TorchScript archive `ViT-B-32.pt` (what `clip.load(jit=True)` reads),
- an OpenAI-layout state dict (`clip.load(jit=False)`, then `torch.save(model.state_dict())`),
- open_clip files: `open_clip_pytorch_model.bin` / `.safetensors` / training checkpoints
  `{"state_dict": ..., "epoch": ...}`, with or without DataParallel's `module.` prefix.
"""

from __future__ import annotations

import warnings
import zipfile
from functools import lru_cache
from typing import TYPE_CHECKING

from pipeline.nets.checkpoints import WeightsError, torch_load, unwrap_state_dict

if TYPE_CHECKING:  # imported where used: the CLIP extractor's module must import without torch
    import torch

# open_clip's name of OpenAI's ViT-B/32: OpenAI's weights need QuickGELU, and open_clip's plain
# 'ViT-B-32' silently builds nn.GELU.
VIT_B_32 = "ViT-B-32-quickgelu"

# Text: the BPE vocabulary has 49,408 entries, the last two being the start and end markers; the
# text tower has 77 positions.
SOT_ID, EOT_ID = 49406, 49407
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77

# Images: OpenAI's per-channel normalisation of RGB values in [0, 1].
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# Integers OpenAI's TorchScript model keeps in its state dict; not parameters of any module.
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")


# -- text -------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def bpe_tokenizer():
    """OpenAI's CLIP BPE tokenizer (open_clip ships it as `SimpleTokenizer`); built once per process."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def text_ids(text: str, max_tokens: int) -> list[int]:
    """<SOT> + the BPE ids of `text` cut to `max_tokens - 2` + <EOT>: at most `max_tokens` ids."""
    return [SOT_ID, *bpe_tokenizer().encode(text)[: max_tokens - 2], EOT_ID]


# -- networks ---------------------------------------------------------------------------------------


def clip_vit_b_32() -> torch.nn.Module:
    """The whole CLIP ViT-B/32 (both towers, OpenAI's parameter names), randomly initialised."""
    import open_clip

    return open_clip.create_model(VIT_B_32, pretrained=None)


def image_tower_vit_b_32(device: str | None = None) -> torch.nn.Module:
    """CLIP ViT-B/32's image tower alone, under the whole model's names (`visual.*`): what image
    features need, without the text tower's 38 M parameters to build (nor open_clip to import: see
    `pipeline.nets.clip_vit`). A seeded random init draws the numbers `clip_vit_b_32()` draws first;
    `device="meta"`: no memory, no init (for weights to be assigned)."""
    import torch

    from pipeline.nets.clip_vit import VisionTransformer

    return torch.nn.ModuleDict({"visual": VisionTransformer(device=device)})


def image_tower_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `visual.*` entries of a whole CLIP's state dict (the text tower's are left out)."""
    return {k: v for k, v in state.items() if k.startswith("visual.")}


# -- weights ----------------------------------------------------------------------------------------


def read_clip_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The state dict (OpenAI key layout) of any supported CLIP file; see the module docstring."""
    if str(path).endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover - safetensors ships with open_clip's deps
            raise WeightsError(f"{path}: reading .safetensors needs the safetensors package") from e
        try:
            return dict(load_file(path, device="cpu"))
        except Exception as e:
            raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    if _is_torchscript(path):
        import torch

        try:
            with warnings.catch_warnings():  # torch.jit is deprecated, but OpenAI's file is TorchScript
                warnings.simplefilter("ignore", FutureWarning)
                scripted = torch.jit.load(path, map_location="cpu")
        except Exception as e:
            raise WeightsError(f"{path}: not a readable TorchScript archive ({e})") from None
        return strip_openai_metadata(scripted.state_dict())
    return strip_openai_metadata(unwrap_state_dict(torch_load(path), path))


def strip_openai_metadata(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` without the integer entries of OpenAI's files (`OPENAI_METADATA_KEYS`)."""
    return {k: v for k, v in state.items() if k not in OPENAI_METADATA_KEYS}


def without_image_tower(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` without the `visual.*` entries, for a CLIP built without its image tower."""
    return {k: v for k, v in state.items() if not k.startswith("visual.")}


def fit_to_model(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`state` in the model's dtypes (OpenAI's files are fp16), with `logit_scale` in the model's shape
    (0-d in open_clip, (1,) in some files). Entries the model lacks are left for the key check."""
    own = model.state_dict()
    state = dict(state)
    if "logit_scale" in own and "logit_scale" in state and state["logit_scale"].numel() == 1:
        state["logit_scale"] = state["logit_scale"].reshape(own["logit_scale"].shape)
    # contiguous: a file's tensors may be views (TorchScript archives), and `assign=True` keeps them as they are
    return {k: v.to(own[k].dtype).contiguous() if k in own else v for k, v in state.items()}


def _is_torchscript(path: str) -> bool:
    """TorchScript archives are zips with a `code/` folder; torch.save zips have only data.pkl."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any("/code/" in n or n.startswith("code/") for n in zf.namelist())
