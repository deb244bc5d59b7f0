"""Grounding and retrieval models, one file each. Each module registers its model in MODELS."""

from pipeline.registry import Registry

MODELS = Registry("model", package="models")
