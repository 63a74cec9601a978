"""Checkpoints and weights: the checkpoint file format (:mod:`.checkpoint`), the external layouts and their key
maps (:mod:`.layouts`), the architecture the weights need (:mod:`.architecture`), the strict loader with its
report (:mod:`.loading`), the model-from-checkpoint factory (:mod:`.factory`) and the converter command line
(``python -m crfrnn_deeplab.weights.convert``, not imported here so that ``python -m`` runs it fresh)."""

from crfrnn_deeplab.weights.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from crfrnn_deeplab.weights.factory import model_for_checkpoint
from crfrnn_deeplab.weights.layouts import LAYOUTS, ConversionError
from crfrnn_deeplab.weights.loading import LoadReport, load_into

__all__ = [
    "CheckpointError",
    "ConversionError",
    "LAYOUTS",
    "LoadReport",
    "load_checkpoint",
    "load_into",
    "model_for_checkpoint",
    "save_checkpoint",
]
