"""GLSCL, text-video retrieval (Zhang et al., TIP 2025): `model.py` holds the network, its losses and
optimiser, `data.py` its data (caption-video pairs, CLIP tokens, frame or frame-feature clips).

Importing the package registers the model in `models.MODELS` under "glscl".
"""

from models.glscl.model import GLSCL

__all__ = ["GLSCL"]
