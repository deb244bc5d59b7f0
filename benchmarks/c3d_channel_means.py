"""The per-channel means of a C3D mean volume: where `extractors.c3d`'s default mean comes from.

    PYTHONPATH=. .venv/bin/python benchmarks/c3d_channel_means.py MEAN_FILE

MEAN_FILE is Caffe's `sport1m_train16_128_mean.binaryproto` or the (3, 16, 128, 171) `.npy` cube the
Keras/TensorFlow ports converted it to (e.g. axon-research/c3d-keras `data/train01_16_128_171_mean.npy.bz2`,
decompressed). Read with vmr's own readers; prints the float64 mean of each channel (B, G, R) over the
volume's 16 x 128 x 171 pixels next to `C3D_MEAN_BGR`.
"""

from __future__ import annotations

import sys

import numpy as np

from extractors.c3d import C3D_MEAN_BGR, C3D_MEAN_VOLUME_SHAPE, read_mean_cube
from pipeline.nets.caffe_blob import read_blob_proto


def main() -> None:
    path = sys.argv[1]
    volume = read_mean_cube(path) if path.endswith(".npy") else read_blob_proto(path)
    volume = volume.reshape(C3D_MEAN_VOLUME_SHAPE)[0].astype(np.float64)
    means = volume.reshape(3, -1).mean(axis=1)
    print("channel means (B, G, R):", ", ".join(f"{m:.8f}" for m in means))
    print("C3D_MEAN_BGR:           ", ", ".join(f"{m:.8f}" for m in C3D_MEAN_BGR))
    print("equal to 8 decimals:", bool(np.allclose(means, C3D_MEAN_BGR, rtol=0, atol=5e-9)))


if __name__ == "__main__":
    main()
