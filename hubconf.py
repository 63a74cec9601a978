"""``torch.hub`` entry points: every registered DeepLab v2 model, optionally with the CRF-as-RNN layer on top.

    model = torch.hub.load("/path/to/crfrnn_deeplab", "deeplabv2_resnet101", source="local", num_classes=21)
    model = torch.hub.load(repo, "deeplabv2_resnet101_msc", source="local", checkpoint="runs/voc12/stage2/last.pt")
    model = torch.hub.load(repo, "deeplabv2_resnet18", source="local", num_classes=6, crf=True)

No weights are hosted or downloaded: ``pretrained=True`` is an error; ``checkpoint=`` loads a file you have
(ours or any layout :mod:`crfrnn_deeplab.weights.layouts` reads): without ``num_classes`` the model is the one the
checkpoint records (it must be the named architecture); with it, the named model is built and the weights are
loaded into it strictly.
"""

from __future__ import annotations

from typing import Any

dependencies = ["torch", "torchvision", "numpy", "PIL"]


def _entry(name: str):
    def build(*, pretrained: bool = False, checkpoint: str | None = None, num_classes: int | None = None,
              crf: bool | dict[str, Any] = False, **options: Any):
        from crfrnn_deeplab import CRFRNN, MeanFieldCRF, get_model
        from crfrnn_deeplab.models import model_spec
        from crfrnn_deeplab.weights import load_into, model_for_checkpoint
        from crfrnn_deeplab.weights.factory import check_crf_options, model_variant, network_name

        if not isinstance(crf, (bool, dict)):  # "no" or [1] would be truthy: a CRF nobody asked for
            raise TypeError(f"{name}: crf must be True, False or a dict of MeanFieldCRF options, got "
                            f"{type(crf).__name__} {crf!r}")
        crf_options = check_crf_options(crf, what=f"{name}: crf") if isinstance(crf, dict) else {}
        if pretrained:
            raise ValueError(f"{name}: no pretrained weights are hosted (nothing is downloaded); pass "
                             "checkpoint='path/to/weights.pt' (ours, torchvision's or a converted DeepLab v2 model)")
        if checkpoint is not None and num_classes is None:  # everything from the checkpoint
            model, _ = model_for_checkpoint(checkpoint, msc=model_spec(name).multi_scale, **options)
            held = network_name(model)
            if held != model_variant(name, multi_scale=False):
                raise ValueError(f"{checkpoint} holds a {held} network, not {name}")
        else:
            if num_classes is None:
                raise TypeError(f"{name}: num_classes is required without a checkpoint")
            model = get_model(name, num_classes=num_classes, **options)
            if checkpoint is not None:  # e.g. a bare state dict: strict, every mismatch is an error
                load_into(model, checkpoint)
        if isinstance(model, CRFRNN):
            if isinstance(crf, dict):  # the options would be ignored
                raise ValueError(f"{name}: {checkpoint} holds a CRF layer with its own options; pass crf=True or "
                                 "leave crf out")
        elif crf is not False:
            model = CRFRNN(network=model, crf=MeanFieldCRF(num_classes=model.num_classes, **crf_options))
        return model

    build.__name__ = name
    build.__doc__ = (
        f"``{name}`` (see crfrnn_deeplab.get_model). Keyword arguments: ``num_classes`` (required without a "
        "checkpoint), ``checkpoint`` (a weights file to load), ``crf`` (True or a dict of MeanFieldCRF options, "
        "without num_classes, which is the model's: add the CRF-as-RNN layer), and the builder's options (e.g. "
        "``output_stride=16``, ``norm='frozen'``)."
    )
    return build


def _register() -> None:
    from crfrnn_deeplab import list_models

    for name in list_models():
        globals()[name] = _entry(name)


_register()
