"""Fixtures shared by the checkpoint tests: a kazuto1011 DeepLab v2 checkpoint and our model loaded from it, and
a light network of ours. Session-scoped: they are only read."""

import pytest
import torch

from crfrnn_deeplab.weights import model_for_checkpoint
from weights.deeplab_ports import R50, X, KazutoDeepLabV2, KazutoMSC, randomise_, build_small


@pytest.fixture(scope="session")
def kazuto():
    """A random kazuto1011 DeepLab v2 (ResNet-50 depth, 5 classes), its MSC state dict and its output on X."""
    ref = randomise_(KazutoDeepLabV2(R50, num_classes=5))
    with torch.no_grad():
        y = ref(X)
    return ref, KazutoMSC(ref).state_dict(), y


@pytest.fixture(scope="session")
def kazuto_model(kazuto):
    """Our model loaded from the kazuto1011 checkpoint (shared by the tests that only read it)."""
    return model_for_checkpoint(kazuto[1])


@pytest.fixture(scope="session")
def small():
    """A light network of ours (ResNet-18 at width 8) and its state dict: fast, and our layout is depth-generic."""
    torch.manual_seed(0)
    net = randomise_(build_small())
    return net, net.state_dict()
