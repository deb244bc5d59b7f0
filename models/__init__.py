"""Grounding and retrieval models, one file each. Each module registers its model in MODELS."""

from pipeline.core.registry import Registry

MODELS = Registry("model", package="models", list_key="models", table_key="model")
