"""crfrnn_deeplab: DeepLab v2 with a trainable fully-connected CRF (CRF-as-RNN), in pure PyTorch."""

from crfrnn_deeplab.preprocessing import CAFFE_CONVENTION, TORCHVISION_CONVENTION, InputConvention

__version__ = "0.1.0"

__all__ = [
    "InputConvention",
    "TORCHVISION_CONVENTION",
    "CAFFE_CONVENTION",
]
