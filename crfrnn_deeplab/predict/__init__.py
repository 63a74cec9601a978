"""Prediction on raw images, one layer above the models: :func:`predict` (the API behind every model's
``predict`` method) and the command line, ``python -m crfrnn_deeplab.predict`` (:mod:`.cli`)."""

from crfrnn_deeplab.predict.api import ImageLike, Prediction, is_single_image, predict, to_raw_batch

__all__ = ["ImageLike", "Prediction", "is_single_image", "predict", "to_raw_batch"]
