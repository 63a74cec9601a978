"""The network: atrous ResNet backbones, ASPP heads, DeepLab v2 and its multi-scale wrapper, the joint
network + CRF model, the input conventions of their weights, and the model registry."""

from crfrnn_deeplab.models import builders  # noqa: F401  (registers the DeepLab v2 builders)
from crfrnn_deeplab.models.aspp import ASPP, ASPP_L_RATES, ASPP_S_RATES, HEAD_RATES, LARGEFOV_RATES, build_head
from crfrnn_deeplab.models.backbone import (
    AtrousResNet,
    resnet18_atrous,
    resnet34_atrous,
    resnet50_atrous,
    resnet101_atrous,
)
from crfrnn_deeplab.models.conventions import CAFFE_CONVENTION, TORCHVISION_CONVENTION, InputConvention
from crfrnn_deeplab.models.crfrnn import CRFRNN, CRFRNNOutput
from crfrnn_deeplab.models.deeplab import DeepLabV2
from crfrnn_deeplab.models.msc import MSC, MSC_SCALES, MSCOutput
from crfrnn_deeplab.models.registry import ModelSpec, get_model, list_models, model_spec, register_model

__all__ = [
    "ASPP",
    "ASPP_L_RATES",
    "ASPP_S_RATES",
    "AtrousResNet",
    "CAFFE_CONVENTION",
    "CRFRNN",
    "CRFRNNOutput",
    "DeepLabV2",
    "HEAD_RATES",
    "InputConvention",
    "LARGEFOV_RATES",
    "MSC",
    "MSCOutput",
    "MSC_SCALES",
    "ModelSpec",
    "TORCHVISION_CONVENTION",
    "build_head",
    "get_model",
    "list_models",
    "model_spec",
    "register_model",
    "resnet101_atrous",
    "resnet18_atrous",
    "resnet34_atrous",
    "resnet50_atrous",
]
