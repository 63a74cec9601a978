"""Reference networks keyed exactly like the DeepLab v2 ports, and the helpers the checkpoint tests share.

The Caffe-port references are assembled from plain torch modules: kazuto1011/deeplab-pytorch
(``libs/models/resnet.py``, ``deeplabv2.py``, ``deeplabv1.py``, ``msc.py``) and isht7/pytorch-deeplab-resnet
(``deeplab_resnet.py``). The layout logic is depth-generic, so the forward checks use the ResNet-50 depth
(3, 4, 6, 3); one test loads the full ResNet-101 key set.
"""

import torch
import torch.nn.functional as F
from torch import nn

from crfrnn_deeplab import MSC, get_model

R50 = (3, 4, 6, 3)
R101 = (3, 4, 23, 3)
TORCHVISION_BLOCKS = {"stride_in_1x1": False, "ceil_mode": False, "dilate_first_block": False}
CAFFE_BLOCKS = {"stride_in_1x1": True, "ceil_mode": True, "dilate_first_block": True}
X = torch.randn(1, 3, 65, 57, generator=torch.Generator().manual_seed(1))

# --- kazuto1011/deeplab-pytorch: _ConvBnReLU, _Bottleneck, _ResLayer, _Stem, DeepLabV2 / DeepLabV1, MSC


class ConvBnReLU(nn.Sequential):
    def __init__(self, cin, cout, k, stride, pad, dil, relu=True):
        super().__init__()
        self.add_module("conv", nn.Conv2d(cin, cout, k, stride, pad, dil, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout, eps=1e-5))
        if relu:
            self.add_module("relu", nn.ReLU())


class KazutoBottleneck(nn.Module):
    def __init__(self, cin, cout, stride, dilation, downsample):
        super().__init__()
        mid = cout // 4
        self.reduce = ConvBnReLU(cin, mid, 1, stride, 0, 1)  # the stride is in the 1×1
        self.conv3x3 = ConvBnReLU(mid, mid, 3, 1, dilation, dilation)
        self.increase = ConvBnReLU(mid, cout, 1, 1, 0, 1, relu=False)
        self.shortcut = ConvBnReLU(cin, cout, 1, stride, 0, 1, relu=False) if downsample else nn.Identity()

    def forward(self, x):
        return torch.relu(self.increase(self.conv3x3(self.reduce(x))) + self.shortcut(x))


def kazuto_trunk(n_blocks):
    """``layer1`` (stem) ... ``layer5`` as in kazuto1011's DeepLabV2: every block of a stage at its dilation."""
    stem = nn.Sequential()
    stem.add_module("conv1", ConvBnReLU(3, 64, 7, 2, 3, 1))
    stem.add_module("pool", nn.MaxPool2d(3, 2, 1, ceil_mode=True))
    layers = [("layer1", stem)]
    plan = [(64, 256, 1, 1), (256, 512, 2, 1), (512, 1024, 1, 2), (1024, 2048, 1, 4)]
    for i, (n, (cin, cout, stride, dilation)) in enumerate(zip(n_blocks, plan)):
        stage = nn.Sequential()
        for b in range(n):
            stage.add_module(
                f"block{b + 1}",
                KazutoBottleneck(cin if b == 0 else cout, cout, stride if b == 0 else 1, dilation, b == 0),
            )
        layers.append((f"layer{i + 2}", stage))
    return layers


class KazutoASPP(nn.Module):
    def __init__(self, num_classes, rates=(6, 12, 18, 24)):
        super().__init__()
        for i, r in enumerate(rates):
            self.add_module(f"c{i}", nn.Conv2d(2048, num_classes, 3, 1, r, r, bias=True))

    def forward(self, x):
        return sum(conv(x) for conv in self.children())


class KazutoDeepLabV2(nn.Sequential):
    def __init__(self, n_blocks, num_classes):
        super().__init__()
        for name, module in kazuto_trunk(n_blocks):
            self.add_module(name, module)
        self.add_module("aspp", KazutoASPP(num_classes))


class KazutoDeepLabV1(nn.Sequential):
    """The container of the COCO-pretrained init: the same trunk and a 1×1 ``fc`` classifier."""

    def __init__(self, n_blocks, num_classes):
        super().__init__()
        for name, module in kazuto_trunk(n_blocks):
            self.add_module(name, module)
        self.add_module("fc", nn.Conv2d(2048, num_classes, 1))


class KazutoMSC(nn.Module):
    """The port's multi-scale wrapper: the base at 1.0 and at each scale (input resized with scale_factor), the
    pyramid resized to the 1.0 score map, the element-wise max there (returned at stride 8)."""

    def __init__(self, base, scales=(0.5, 0.75)):
        super().__init__()
        self.base = base
        self.scales = scales

    def forward(self, x):
        logits = self.base(x)
        size = logits.shape[-2:]
        pyramid = [self.base(F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)) for s in self.scales]
        resized = [F.interpolate(z, size=size, mode="bilinear", align_corners=False) for z in pyramid]
        return torch.stack([logits] + resized).max(0).values


# --- isht7/pytorch-deeplab-resnet: Bottleneck, Classifier_Module, ResNet, MS_Deeplab


class IshtBottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


class IshtClassifier(nn.Module):
    def __init__(self, rates, num_classes):
        super().__init__()
        self.conv2d_list = nn.ModuleList(nn.Conv2d(2048, num_classes, 3, 1, r, r, bias=True) for r in rates)

    def forward(self, x):
        out = self.conv2d_list[0](x)
        for conv in self.conv2d_list[1:]:
            out = out + conv(x)
        return out


class IshtResNet(nn.Module):
    def __init__(self, layers, num_classes):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], dilation=2)
        self.layer4 = self._make_layer(512, layers[3], dilation=4)
        self.layer5 = IshtClassifier((6, 12, 18, 24), num_classes)

    def _make_layer(self, planes, blocks, stride=1, dilation=1):
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
        )
        layers = [IshtBottleneck(self.inplanes, planes, stride, dilation, downsample)]
        self.inplanes = planes * 4
        layers += [IshtBottleneck(self.inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4, self.layer5):
            x = layer(x)
        return x


class IshtMSDeeplab(nn.Module):
    def __init__(self, layers, num_classes):
        super().__init__()
        self.Scale = IshtResNet(layers, num_classes)


# --- helpers


def randomise_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights *and* BatchNorm statistics (so that any wrong mapping shows in the outputs), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (1.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.num_batches_tracked.fill_(7)
    return module.eval()


def assert_same(actual, expected):
    """Equal up to float32 summation order (relative to the output's scale)."""
    assert actual.shape == expected.shape
    scale = expected.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def scores(model, x):
    """Stride-8 class scores of the bare DeepLabV2 inside ``model``."""
    net = model.model if isinstance(model, MSC) else model
    with torch.no_grad():
        return net.eval().scores(x)


def features(model, x):
    net = model.model if isinstance(model, MSC) else model
    with torch.no_grad():
        return net.eval().backbone(x)


def trunk(ref, x):
    with torch.no_grad():
        for name in ("layer1", "layer2", "layer3", "layer4", "layer5"):
            x = getattr(ref, name)(x)
    return x


def build_small(num_classes=3):
    return get_model("deeplabv2_resnet18", num_classes=num_classes, base_width=8)
