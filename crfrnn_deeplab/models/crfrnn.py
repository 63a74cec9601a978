"""The joint model: a segmentation network with the dense CRF layer on its logits (CRF-as-RNN).

Zheng et al., "Conditional Random Fields as Recurrent Neural Networks", ICCV 2015: the network's unary
logits go through mean-field iterations whose parameters train with the network's, end to end.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from crfrnn_deeplab.crf.mean_field import MeanFieldCRF
from crfrnn_deeplab.models.conventions import InputConvention
from crfrnn_deeplab.models.msc import MSCOutput
from crfrnn_deeplab.models.predictor import PredictMixin

__all__ = ["CRFRNN", "CRFRNNOutput"]


class CRFRNNOutput(NamedTuple):
    """What :class:`CRFRNN` returns.

    Attributes:
        network: the network's own output: logits (Tensor[B, C, H, W]), or an :class:`MSCOutput` when the
            network is an MSC model in training mode.
        crf: the CRF's logits (Tensor[B, C, H, W]), computed from the network's (fused) logits.
    """

    network: Tensor | MSCOutput
    crf: Tensor


class CRFRNN(PredictMixin, nn.Module):
    """``crf(network(x), raw image)``: DeepLab (or any segmentation network) + :class:`MeanFieldCRF`.

    Args:
        network: maps normalised images (Tensor[B, 3, H, W]) to logits (Tensor[B, C, H, W]) at the input size,
            or to an :class:`MSCOutput` in training mode; must carry ``input_convention`` and ``num_classes``.
        crf: the CRF layer, built for the same number of classes.

    State_dict keys: ``network.*`` (the network's own keys) and ``crf.*``.
    """

    def __init__(self, *, network: nn.Module, crf: MeanFieldCRF) -> None:
        super().__init__()
        if not isinstance(getattr(network, "input_convention", None), InputConvention):
            raise TypeError("network must carry an InputConvention as `input_convention` (the network contract)")
        num_classes = getattr(network, "num_classes", None)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int):
            raise TypeError(f"network must have an int attribute `num_classes` (the network contract), got "
                            f"{num_classes!r}")
        if not isinstance(crf, nn.Module) or not isinstance(getattr(crf, "num_classes", None), int):
            raise TypeError(
                f"crf must be a CRF layer such as MeanFieldCRF(num_classes={network.num_classes}), "
                f"got {type(crf).__name__}"
            )
        if network.num_classes != crf.num_classes:
            raise ValueError(f"network has {network.num_classes} classes, the CRF {crf.num_classes}")
        self.network = network
        self.crf = crf

    @property
    def input_convention(self) -> InputConvention:
        return self.network.input_convention

    @property
    def num_classes(self) -> int:
        return self.network.num_classes

    def preprocess(self, images: Tensor) -> Tensor:
        """Raw RGB 0-255 images (Tensor[B, 3, H, W]) to the network input its weights expect."""
        return self.network.preprocess(images)

    def forward(self, x: Tensor, raw: Tensor, valid_mask: Tensor | None = None) -> CRFRNNOutput:
        """Network logits and CRF logits.

        Args:
            x: Tensor[B, 3, H, W], normalised images (``model.preprocess(raw)``).
            raw: Tensor[B, 3, H, W], the same images as raw RGB in 0–255 (what the CRF's kernels compare).
            valid_mask: Tensor[B, H, W] bool or None; padded pixels (False) neither send nor receive messages.

        Returns:
            :class:`CRFRNNOutput` (network output, CRF logits Tensor[B, C, H, W] float32, or float64 for float64
            logits).

        Raises:
            TypeError: ``x`` or ``raw`` is not a Tensor, or the network returned no logits tensor (a dict, a
                tuple); and the network's and :class:`MeanFieldCRF`'s errors for inputs of a wrong type.
            ValueError: ``x`` is not 4-D, the shapes of ``x`` and ``raw`` differ, or the network's logits are not
                ``[B, num_classes, H, W]`` at the input's size; and the network's and :class:`MeanFieldCRF`'s errors
                for bad values or shapes.
        """
        for name, value in (("x", x), ("raw", raw)):
            if not isinstance(value, Tensor):
                raise TypeError(f"{name} must be a Tensor[B, 3, H, W], got {type(value).__name__}")
        if x.dim() != 4:
            raise ValueError(f"x must be a Tensor[B, 3, H, W], got shape {tuple(x.shape)}")
        if raw.shape != x.shape:
            raise ValueError(
                f"raw must be the raw RGB image with the shape of x {tuple(x.shape)}, got {tuple(raw.shape)}"
            )
        out = self.network(x)
        logits = out.fused if isinstance(out, MSCOutput) else out
        self._check_network_logits(logits, x)
        return CRFRNNOutput(out, self.crf(logits, raw, valid_mask))

    def _check_network_logits(self, logits: object, x: Tensor) -> None:
        """Names a network that breaks its contract (logits Tensor[B, C, H, W] at the input's size, C =
        ``num_classes``): the CRF's own message would speak of its logits and image, which the caller never gave."""
        b, _, h, w = x.shape
        expected = f"Tensor[B, C, H, W] = ({b}, {self.num_classes}, {h}, {w})"
        if not isinstance(logits, Tensor):
            got = type(logits).__name__
            if isinstance(logits, dict):  # torchvision's segmentation models: {"out": ..., "aux": ...}
                got += f" with keys {list(logits)}: wrap the network to return one of them, e.g. its ['out']"
            raise TypeError(f"the network must return logits {expected} (or an MSCOutput), got {got}")
        if logits.dim() != 4 or logits.shape[0] != b or tuple(logits.shape[2:]) != (h, w):
            resize = logits.dim() == 4 and logits.shape[0] == b and logits.shape[1] == self.num_classes
            hint = "upsample its logits to its input's size" if resize else "return them channels first"
            raise ValueError(f"the network returned logits of shape {tuple(logits.shape)}, expected {expected}: "
                             f"it must {hint} (the network contract)")
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"the network returned logits of {logits.shape[1]} classes, but its num_classes (and "
                             f"the CRF's) is {self.num_classes}")

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Trainable backbone parameters (base learning rate)."""
        return self.network.backbone_parameters()

    def head_weights(self) -> list[nn.Parameter]:
        """Trainable head weights (10× learning rate in DeepLab v2)."""
        return self.network.head_weights()

    def head_biases(self) -> list[nn.Parameter]:
        """Trainable head biases (20× learning rate, no weight decay)."""
        return self.network.head_biases()

    def crf_parameters(self) -> list[nn.Parameter]:
        """Trainable CRF parameters (their own group)."""
        return [p for p in self.crf.parameters() if p.requires_grad]
