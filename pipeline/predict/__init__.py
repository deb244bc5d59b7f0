"""Prediction on new videos with a trained checkpoint: `vmr predict`, `vmr search` and the Python API.

    from pipeline.predict import Predictor, RecipeMismatch
    p = Predictor.from_checkpoint("runs/mmn/best.pt")
    p.predict("video.mp4", ["a person opens a door"], top_k=5)

recipe.py     the checkpoint's feature recipe, read from provenance; what cannot be reproduced
features.py   decode + extract + merge of new videos with that recipe (the pipeline's code), cached
predictor.py  the Predictor: the model's own prediction path on those features
queries.py    query files (QVHighlights-style jsonl without windows, or one query per line)
output.py     json / jsonl / csv / srt writers and the self-contained HTML page
"""

from pipeline.predict.predictor import PredictError, Predictor, RecipeMismatch

__all__ = ["PredictError", "Predictor", "RecipeMismatch"]
