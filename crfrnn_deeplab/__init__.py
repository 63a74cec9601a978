"""crfrnn_deeplab: DeepLab v2 with a trainable fully-connected CRF (CRF-as-RNN), in pure PyTorch.

The subsystems (README "Architecture"):

- :mod:`crfrnn_deeplab.models`: the network (atrous ResNet, ASPP, DeepLab v2, MSC, network + CRF) and the
  model registry (:func:`get_model`, :func:`list_models`);
- :mod:`crfrnn_deeplab.crf`: the dense CRF (:class:`MeanFieldCRF`, the layer; :class:`DenseCRF`, one-call
  post-processing; the permutohedral lattice; the spatial Gaussian; the exact reference);
- :mod:`crfrnn_deeplab.data`: datasets and the DeepLab transforms;
- :mod:`crfrnn_deeplab.weights`: checkpoints, external checkpoint layouts, strict loading with a report;
- :mod:`crfrnn_deeplab.predict`: prediction on raw images (API and command line);
- :mod:`crfrnn_deeplab.training`: what ``train.py`` is built from (config, data stream, loss, metrics, ...);
- :mod:`crfrnn_deeplab.images`: the validators and resizing rules every entry point shares.
"""

from crfrnn_deeplab import data
from crfrnn_deeplab.crf import DenseCRF, MeanFieldCRF, PermutohedralLattice, SparseRows, build_lattice
from crfrnn_deeplab.crf import lattice_gaussian, spatial_gaussian
from crfrnn_deeplab.data import EvalTransform, TrainTransform
from crfrnn_deeplab.models import (
    ASPP,
    ASPP_L_RATES,
    ASPP_S_RATES,
    CAFFE_CONVENTION,
    CRFRNN,
    HEAD_RATES,
    LARGEFOV_RATES,
    MSC,
    MSC_SCALES,
    TORCHVISION_CONVENTION,
    AtrousResNet,
    CRFRNNOutput,
    DeepLabV2,
    InputConvention,
    MSCOutput,
    build_head,
    get_model,
    list_models,
    register_model,
    resnet18_atrous,
    resnet34_atrous,
    resnet50_atrous,
    resnet101_atrous,
)
from crfrnn_deeplab.predict import Prediction, predict
from crfrnn_deeplab.weights import LoadReport, load_into, model_for_checkpoint

#: The datasets (an alias of :mod:`crfrnn_deeplab.data`, the name earlier versions exported).
datasets = data

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
    "Prediction",
    "SparseRows",
    "TORCHVISION_CONVENTION",
    "TrainTransform",
    "build_head",
    "build_lattice",
    "data",
    "datasets",
    "get_model",
    "lattice_gaussian",
    "list_models",
    "load_into",
    "model_for_checkpoint",
    "predict",
    "register_model",
    "resnet101_atrous",
    "resnet18_atrous",
    "resnet34_atrous",
    "resnet50_atrous",
    "spatial_gaussian",
]
