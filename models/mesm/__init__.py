"""MESM, moment retrieval with modal-enhanced semantic modeling (Liu et al., AAAI'24).

    model.py      the registered model: Config, trainer contract, decoding, metrics, clip_len check
    network.py    MESMNet: the forward pass, word masking and negative sampling
    layers.py     its building blocks: projections, positions, attention layers, DETR transformer
    criterion.py  matcher and losses
    text.py       frozen text encoders, count files, MesmTokenizer
    data.py       one item per video, GT frames and saliency targets, collate
    spans.py      span conversions, temporal IoU / gIoU, padding

Importing the package registers the model in `models.MODELS` under "mesm".
"""

from models.mesm.criterion import (
    MESMCriterion,
    label_smoothed_nll,
    match_hungarian,
    match_top1,
    saliency_loss,
    segment_sentence_loss,
)
from models.mesm.model import MESM, check_clip_len, decode_predictions, mesm_metrics
from models.mesm.network import MESMNet, mask_words, sample_outclass_negatives
from models.mesm.spans import generalized_temporal_iou, span_cxw_to_xx, span_xx_to_cxw
from models.mesm.text import (
    ClipTextEncoder,
    MesmTokenizer,
    build_clip_text_tower,
    load_clip_text_checkpoint,
)

__all__ = [
    "MESM",
    "ClipTextEncoder",
    "MESMCriterion",
    "MESMNet",
    "MesmTokenizer",
    "build_clip_text_tower",
    "check_clip_len",
    "decode_predictions",
    "generalized_temporal_iou",
    "label_smoothed_nll",
    "load_clip_text_checkpoint",
    "mask_words",
    "match_hungarian",
    "match_top1",
    "mesm_metrics",
    "saliency_loss",
    "sample_outclass_negatives",
    "segment_sentence_loss",
    "span_cxw_to_xx",
    "span_xx_to_cxw",
]
