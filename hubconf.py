"""``torch.hub`` entry points: every registered DeepLab v2 model, optionally with the CRF-as-RNN layer on top.

    model = torch.hub.load("/path/to/crfrnn_deeplab", "deeplabv2_resnet101", source="local", num_classes=21)
    model = torch.hub.load(repo, "deeplabv2_resnet101_msc", source="local", checkpoint="runs/voc12/stage2/last.pt")
    model = torch.hub.load(repo, "deeplabv2_resnet18", source="local", num_classes=6, crf=True)

No weights are hosted or downloaded: ``pretrained=True`` is an error; ``checkpoint=`` loads a file you have
(ours or any layout :mod:`crfrnn_deeplab.weights.layouts` reads). Without ``num_classes`` the model is the one the
checkpoint records (its network must be the named one); with it, the named model is built with those classes and
the checkpoint's weights are loaded into it (:func:`~crfrnn_deeplab.weights.load_into`: another number of classes
re-initialises the classifier and the CRF's class matrices).

``crf``: ``None`` (the default) keeps what the checkpoint holds, a CRF-as-RNN layer (loaded, not re-initialised)
or none; ``True`` adds a new CRF layer at its initial values where the checkpoint holds none; ``False`` returns
the network without one (the checkpoint's CRF left out); a dict of :class:`~crfrnn_deeplab.MeanFieldCRF` options
adds a new CRF with them (for a checkpoint that holds a CRF, the options its weights load into where the checkpoint
records none, as a bare state dict; an error where it records them). A checkpoint whose weights and model_config
disagree on the CRF is refused without ``num_classes`` and read as its weights say with it.
"""

from __future__ import annotations

import logging
from typing import Any

dependencies = ["torch", "torchvision", "numpy", "PIL"]

logger = logging.getLogger("crfrnn_deeplab.hub")


def _entry(name: str):
    def build(*, pretrained: bool = False, checkpoint: str | None = None, num_classes: int | None = None,
              crf: bool | dict[str, Any] | None = None, **options: Any):
        from crfrnn_deeplab import CRFRNN, MeanFieldCRF, get_model
        from crfrnn_deeplab.models import model_spec
        from crfrnn_deeplab.weights.factory import build_for_checkpoint, check_crf_options, model_variant, network_name
        from crfrnn_deeplab.weights.factory import recorded_crf_options
        from crfrnn_deeplab.weights.layouts import convert_state_dict
        from crfrnn_deeplab.weights.loading import load_converted

        if crf is not None and not isinstance(crf, (bool, dict)):  # "no" or [1]: truthy, a CRF nobody asked for
            raise TypeError(f"{name}: crf must be None (as the checkpoint), True, False or a dict of MeanFieldCRF "
                            f"options, got {type(crf).__name__} {crf!r}")
        crf_options = check_crf_options(crf, what=f"{name}: crf") if isinstance(crf, dict) else {}
        if pretrained:
            raise ValueError(f"{name}: no pretrained weights are hosted (nothing is downloaded); pass "
                             "checkpoint='path/to/weights.pt' (ours, torchvision's or a converted DeepLab v2 model)")
        if checkpoint is None:
            if num_classes is None:
                raise TypeError(f"{name}: num_classes is required without a checkpoint")
            model = get_model(name, num_classes=num_classes, **options)
        else:
            converted = convert_state_dict(checkpoint)
            recorded = recorded_crf_options(converted)  # its model_config's CRF options, None without a CRF
            if recorded is not None and isinstance(crf, dict):  # the options would be ignored
                raise ValueError(f"{name}: {checkpoint} records its CRF layer's options; pass crf=True or leave crf "
                                 "out (crf=False leaves the CRF out)")
            if num_classes is None:  # everything from the checkpoint
                if converted.layout == "crfrnn_deeplab" and converted.has_crf != (recorded is not None):
                    # a hand-made checkpoint: which one is right? (build_for_checkpoint refuses it too)
                    weights, config = ("a", "none") if converted.has_crf else ("no", "one")
                    raise ValueError(f"{name}: {checkpoint}'s weights hold {weights} CRF layer but its model_config "
                                     f"records {config}; pass num_classes to load the weights into the named model")
                _, model, _ = build_for_checkpoint(converted, msc=model_spec(name).multi_scale, options=options)
                held = network_name(model)
                if held != model_variant(name, multi_scale=False):
                    raise ValueError(f"{checkpoint} holds a {held} network, not {name}")
            else:  # the named model with these classes; the checkpoint's CRF weights load into a CRF layer
                model = get_model(name, num_classes=num_classes, **options)
                if converted.has_crf and crf is not False:
                    if recorded is None and not isinstance(crf, dict):
                        logger.warning("%s records no options of its CRF layer: it gets MeanFieldCRF's defaults (pass "
                                       "crf={...} with the options it was built with)", checkpoint)
                    held_options = crf_options if isinstance(crf, dict) else recorded or {}
                    model = CRFRNN(network=model, crf=MeanFieldCRF(num_classes=num_classes, **held_options))
                load_converted(model, converted)  # strict: every mismatch but the named ones is an error
        if isinstance(model, CRFRNN):
            return model.network if crf is False else model
        if crf is True or isinstance(crf, dict):
            model = CRFRNN(network=model, crf=MeanFieldCRF(num_classes=model.num_classes, **crf_options))
        return model

    build.__name__ = name
    build.__doc__ = (
        f"``{name}`` (see crfrnn_deeplab.get_model). Keyword arguments: ``num_classes`` (required without a "
        "checkpoint), ``checkpoint`` (a weights file to load), ``crf`` (None: as the checkpoint, with its CRF "
        "layer if it holds one; True: a CRF-as-RNN layer, new where the checkpoint holds none; False: none; a dict of "
        "MeanFieldCRF options without num_classes, which is the model's: a new CRF layer with them), ``pretrained`` "
        "(False only: no weights are hosted), and the builder's options (e.g. ``output_stride=16``, "
        "``norm='frozen'``). See the module's docstring."
    )
    return build


def _register() -> None:
    from crfrnn_deeplab import list_models

    for name in list_models():
        globals()[name] = _entry(name)


_register()
