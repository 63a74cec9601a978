"""Prediction on raw images, one layer above the models: :func:`predict` (the API behind every model's
``predict`` method) and the command line, ``python -m crfrnn_deeplab.predict`` (:mod:`.cli`)."""

from crfrnn_deeplab.images import MAX_SCALE  # the input scales' bound (images.check_scales), for predict's users
from crfrnn_deeplab.predict.api import (
    MAX_CRF_ITERATIONS,
    ImageLike,
    Prediction,
    check_crf_iterations,
    is_single_image,
    predict,
    resolve_device,
    to_raw_batch,
)

__all__ = [
    "MAX_CRF_ITERATIONS",
    "MAX_SCALE",
    "ImageLike",
    "Prediction",
    "check_crf_iterations",
    "is_single_image",
    "predict",
    "resolve_device",
    "to_raw_batch",
]
