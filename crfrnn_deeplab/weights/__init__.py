"""Checkpoints and weights: the checkpoint file format (:mod:`.checkpoint`), the external layouts' key maps, the
strict loader with its report, the model-from-checkpoint factory and the converter command line
(``python -m crfrnn_deeplab.weights.convert``)."""

from crfrnn_deeplab.weights.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from crfrnn_deeplab.weights.convert import LoadReport, load_into, model_for_checkpoint

__all__ = ["CheckpointError", "LoadReport", "load_checkpoint", "load_into", "model_for_checkpoint", "save_checkpoint"]
