"""crfrnn_deeplab: DeepLab v2 with a trainable fully-connected CRF (CRF-as-RNN), in pure PyTorch.

The public API (see README.md):

- models: :func:`get_model`, :func:`list_models`, :class:`DeepLabV2`, :class:`MSC`, the atrous backbones and
  the ASPP heads;
- the CRF: :class:`MeanFieldCRF` (the layer), :class:`DenseCRF` (one-call post-processing), :func:`build_lattice` / :func:`lattice_gaussian` (the
  permutohedral lattice), :func:`spatial_gaussian`;
- data: :mod:`crfrnn_deeplab.datasets`, :class:`TrainTransform`, :class:`EvalTransform`;
- preprocessing: :class:`InputConvention` and the two conventions weights come with.
"""

from crfrnn_deeplab import datasets
from crfrnn_deeplab.aspp import ASPP, ASPP_L_RATES, ASPP_S_RATES, HEAD_RATES, LARGEFOV_RATES, build_head
from crfrnn_deeplab.backbone import AtrousResNet, resnet18_atrous, resnet34_atrous, resnet50_atrous, resnet101_atrous
from crfrnn_deeplab.crf import MeanFieldCRF
from crfrnn_deeplab.crfrnn import CRFRNN, CRFRNNOutput
from crfrnn_deeplab.dense_crf import DenseCRF
from crfrnn_deeplab.deeplab import MSC, MSC_SCALES, DeepLabV2, MSCOutput
from crfrnn_deeplab.permutohedral import PermutohedralLattice, SparseRows, build_lattice, lattice_gaussian
from crfrnn_deeplab.preprocessing import CAFFE_CONVENTION, TORCHVISION_CONVENTION, InputConvention
from crfrnn_deeplab.registry import get_model, list_models, register_model
from crfrnn_deeplab.spatial_filter import spatial_gaussian
from crfrnn_deeplab.transforms import EvalTransform, TrainTransform

__version__ = "0.1.0"

__all__ = [
    "ASPP",
    "ASPP_L_RATES",
    "ASPP_S_RATES",
    "AtrousResNet",
    "CAFFE_CONVENTION",
    "CRFRNN",
    "CRFRNNOutput",
    "DeepLabV2",
    "DenseCRF",
    "EvalTransform",
    "HEAD_RATES",
    "InputConvention",
    "LoadReport",
    "LARGEFOV_RATES",
    "MSC",
    "MSCOutput",
    "MSC_SCALES",
    "MeanFieldCRF",
    "PermutohedralLattice",
    "SparseRows",
    "TORCHVISION_CONVENTION",
    "TrainTransform",
    "build_head",
    "build_lattice",
    "datasets",
    "get_model",
    "lattice_gaussian",
    "list_models",
    "load_into",
    "model_for_checkpoint",
    "register_model",
    "resnet101_atrous",
    "resnet18_atrous",
    "resnet34_atrous",
    "resnet50_atrous",
    "spatial_gaussian",
]


def __getattr__(name: str):
    # The converter is also a script (`python -m crfrnn_deeplab.convert`): importing it lazily keeps runpy from
    # finding it half-imported.
    if name in ("LoadReport", "load_into", "model_for_checkpoint"):
        from crfrnn_deeplab import convert

        return getattr(convert, name)
    raise AttributeError(f"module 'crfrnn_deeplab' has no attribute {name!r}")
