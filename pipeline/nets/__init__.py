"""Pretrained-network helpers shared by extractors and models: checkpoint formats and CLIP.

`checkpoints` reads torch checkpoint files and checks a state dict against a model, with errors
that name the file and the keys; `caffe_blob` reads Caffe `.binaryproto` blobs (the C3D mean
volume); `clip` holds what every CLIP user needs (constants, the BPE tokenizer, the official
weights files).
"""
