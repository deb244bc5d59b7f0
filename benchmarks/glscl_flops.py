"""FLOPs of GLSCL's similarity head at the published shape (ViT-B/32, T=12 frames, L=32 tokens, Nq=8).

Counted with torch.utils.flop_counter (1 multiply-add = 2 FLOPs; softmax/norms not counted), on the
modules that run after the CLIP encoders:
  per video: temporal transformer (4 layers) + decoder over its 12 frames  -> offline, once per video
  per text:  decoder over its 32 token features                             -> offline, once per text
  per pair:  global interaction + local score                               -> online, N_text x N_video
Run: .venv/bin/python benchmarks/glscl_flops.py  (a few seconds on CPU; numbers in docs/glscl.md)
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.glscl import GLSCL


def count(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:  # forward only (no backward is run)
        fn(*args)
    return counter.get_total_flops()


def main() -> None:
    torch.manual_seed(0)
    cfg = GLSCL.Config(input="features", weights=None)
    model = GLSCL(cfg).eval()
    T, L, D = cfg.max_frames, cfg.max_words, cfg.embed_dim
    frames, vmask = torch.randn(1, T, D), torch.ones(1, T)
    tokens, tmask = torch.randn(1, L, D), torch.ones(1, L)
    temporal = count(model.temporal_module, frames, vmask)
    video_dec = count(model.local_concepts, frames, vmask, "video")
    text_dec = count(model.local_concepts, tokens, tmask, "text")
    text = (torch.randn(1, D), torch.nn.functional.normalize(torch.randn(1, cfg.num_queries, D), dim=-1))
    video = (frames, vmask, torch.nn.functional.normalize(torch.randn(1, cfg.num_queries, D), dim=-1))
    pair = count(model.similarity, text, video)
    g = 1e9
    print(f"per video: temporal {temporal / g:.3f} G + decoder {video_dec / g:.3f} G = {(temporal + video_dec) / g:.3f} GFLOPs")
    print(f"per text:  decoder {text_dec / g:.3f} GFLOPs")
    print(f"per pair:  {pair} FLOPs (global {4 * T * D + 2 * D}, local {2 * cfg.num_queries * D})")
    total = temporal + video_dec + text_dec + pair
    print(f"one text + one video through the head: {total / g:.3f} GFLOPs")


if __name__ == "__main__":
    main()
