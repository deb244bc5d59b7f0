"""How far vmr's C3D frames are from Caffe's: the 112x112 crops of 128x171 frames, per pixel.

    pip install opencv-python-headless   # only for this check; vmr does not use OpenCV
    python benchmarks/check_c3d_frames_vs_opencv.py [--out results.json]

Caffe (facebook/C3D v1.0, `ReadVideoToVolumeDatum` / `ReadImageSequenceToVolumeDatum`) resizes every
original frame once to 171x128 with `cv::resize` (default bilinear) and crops 112 at (8, 29). vmr
resizes twice: short side 128 at decode (swscale bilinear, `pipeline.media.decode.resize_crop`), then
to 128x171 in `group` (torch bilinear, antialiased). Both start here from the same decoded RGB frames,
so the decoder's colour conversion is left out; the mean subtraction is equal on both sides (exact,
tested) and left out too. Also shown: one torch bilinear resize without antialiasing from the original
frame, the closest torch equivalent of OpenCV's.

The frames are synthetic: smooth gradients, alone and with seeded noise (sigma 40), so the numbers
bracket the difference between flat and very detailed content, not what it is on a given dataset.
"""

from __future__ import annotations

import argparse
import itertools
import json

import av
import cv2
import numpy as np
import torch
import torch.nn.functional as F

from extractors import EXTRACTORS
from extractors._snippets import c3d_resize_crop
from pipeline.media.decode import resize_crop

SIZES = [(320, 240), (640, 360), (1280, 720), (171, 128)]  # (width, height) of the source video


def source_frames(width: int, height: int, noise: float, n: int = 8) -> list[av.VideoFrame]:
    rng = np.random.default_rng(width)
    y, x = np.mgrid[0:height, 0:width]
    frames = []
    for i in range(n):
        smooth = np.stack([(x * 255 // width + i * 9) % 256, y * 255 // height, (x + y + i * 13) % 256], -1)
        texture = rng.normal(0, noise, (height, width, 3)) if noise else 0
        img = np.clip(smooth + texture, 0, 255).astype(np.uint8)
        frames.append(av.VideoFrame.from_ndarray(img, format="rgb24"))
    return frames


def crop(frames: np.ndarray) -> np.ndarray:
    return frames[:, 8:120, 29:141]


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"mean_abs": round(float(d.mean()), 3), "max_abs": int(d.max()), "share_differing": round(float((d > 0).mean()), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    proto = EXTRACTORS.get("c3d")().protocol()
    results = {}
    for (width, height), noise in itertools.product(SIZES, (0, 40)):
        frames = source_frames(width, height, noise)
        rgb = np.stack([f.to_ndarray(format="rgb24") for f in frames])
        caffe = crop(np.stack([cv2.resize(f[..., ::-1], (171, 128))[..., ::-1] for f in rgb]))  # BGR like Caffe
        decoded = np.stack([resize_crop(f, proto) for f in frames])
        vmr = c3d_resize_crop(torch.from_numpy(decoded)).numpy()
        plain = F.interpolate(torch.from_numpy(rgb).permute(0, 3, 1, 2).float(), size=(128, 171), mode="bilinear",
                              align_corners=False, antialias=False)
        plain = crop(plain.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
        name = f"{width}x{height} noise {noise}"
        results[name] = {
            "decode_size": list(decoded.shape[1:3]),
            "vmr_vs_caffe": compare(vmr, caffe),
            "torch_bilinear_once_vs_caffe": compare(plain, caffe),
        }
        print(f"{name}: {json.dumps(results[name])}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"opencv": cv2.__version__, "torch": torch.__version__, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
