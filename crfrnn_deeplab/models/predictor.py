"""The ``predict`` convenience every model of the package has (:class:`DeepLabV2`, :class:`MSC`, :class:`CRFRNN`).

The computation lives one layer up, in :func:`crfrnn_deeplab.predict.predict`, which works on any model with a
``preprocess`` method (and runs a ``crf`` attribute after its ``network``); it imports nothing from
:mod:`crfrnn_deeplab.models`, so this mixin adds no import cycle.
"""

from __future__ import annotations

from collections.abc import Sequence

from crfrnn_deeplab.predict.api import ImageLike, Prediction, is_single_image, predict

__all__ = ["PredictMixin"]


class PredictMixin:
    """Adds :meth:`predict` to an ``nn.Module`` model that has a ``preprocess`` method."""

    def predict(self, images: ImageLike | Sequence[ImageLike], **options) -> Prediction | list[Prediction]:
        """Segments raw RGB images (numpy ``uint8 [H, W, 3]``, PIL, or ``Tensor[3, H, W]`` / ``[B, 3, H, W]`` in
        0-255) in eval mode; a CRF model runs network then CRF (``crf=False``: network only).

        Args:
            images: one image or a list of images of any sizes.
            **options: the keyword options of :func:`crfrnn_deeplab.predict.predict` (``crf``,
                ``crf_iterations``, ``scales``, ``flip``, ``device``, ``batch_size``).

        Returns:
            One :class:`~crfrnn_deeplab.predict.Prediction` for one image, a list for a list or a 4-D tensor.
        """
        predictions = predict(self, images, **options)
        return predictions[0] if is_single_image(images) else predictions
