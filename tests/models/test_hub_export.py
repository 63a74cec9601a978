"""torch.hub entry points on a local clone, torch.export / ONNX export of the network, torch.compile."""

from pathlib import Path

import pytest
import torch

from crfrnn_deeplab import CRFRNN, MSC, DeepLabV2, MeanFieldCRF, get_model

ROOT = Path(__file__).resolve().parents[2]


def tiny_network():
    torch.manual_seed(0)
    return get_model("deeplabv2_resnet18", num_classes=4, base_width=8).eval()


def test_hub_load_builds_every_kind_of_model():
    model = torch.hub.load(str(ROOT), "deeplabv2_resnet101", source="local", num_classes=21)
    assert isinstance(model, DeepLabV2) and model.num_classes == 21
    assert sum(p.numel() for p in model.backbone.parameters()) == 42_500_160  # torchvision's ResNet-101 trunk
    msc = torch.hub.load(str(ROOT), "deeplabv2_resnet18_msc", source="local", num_classes=3, base_width=8)
    assert isinstance(msc, MSC)
    joint = torch.hub.load(str(ROOT), "deeplabv2_resnet18", source="local", num_classes=3, base_width=8,
                           crf={"eval_iterations": 3})
    assert isinstance(joint, CRFRNN) and joint.crf.eval_iterations == 3


def test_hub_load_reads_a_checkpoint_file(tmp_path):
    trained = tiny_network()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "weights.pt"
    torch.save(trained.state_dict(), path)
    loaded = torch.hub.load(str(ROOT), "deeplabv2_resnet18", source="local", checkpoint=str(path), num_classes=4,
                            base_width=8)
    for (name, a), b in zip(trained.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(Exception, match="holds ResNet-18, the model ResNet-34"):
        torch.hub.load(str(ROOT), "deeplabv2_resnet34", source="local", checkpoint=str(path), num_classes=4,
                       base_width=8)
    ours = tmp_path / "ours.pt"  # a self-describing checkpoint: the model comes from the file
    torch.save({"format": "crfrnn_deeplab/1", "model": trained.state_dict(),
                "model_config": {"name": "deeplabv2_resnet18", "num_classes": 4, "options": {"base_width": 8}}}, ours)
    assert isinstance(torch.hub.load(str(ROOT), "deeplabv2_resnet18", source="local", checkpoint=str(ours)), DeepLabV2)
    with pytest.raises(ValueError, match="holds a deeplabv2_resnet18 network, not deeplabv2_resnet34"):
        torch.hub.load(str(ROOT), "deeplabv2_resnet34", source="local", checkpoint=str(ours))


def test_hub_refuses_to_download():
    with pytest.raises(ValueError, match="no pretrained weights are hosted"):
        torch.hub.load(str(ROOT), "deeplabv2_resnet18", source="local", num_classes=3, pretrained=True)
    with pytest.raises(TypeError, match="num_classes is required"):
        torch.hub.load(str(ROOT), "deeplabv2_resnet18", source="local")


def test_network_exports_with_torch_export():
    net = tiny_network()
    x = torch.rand(2, 3, 65, 73)
    program = torch.export.export(net, (x,))
    torch.testing.assert_close(program.module()(x), net(x), rtol=1e-4, atol=1e-5)


def test_network_exports_to_onnx_and_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    net = tiny_network()
    x = torch.rand(1, 3, 65, 65)
    path = tmp_path / "deeplab.onnx"
    torch.onnx.export(net, (x,), str(path), dynamo=True, input_names=["image"], output_names=["logits"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"image": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), net(x), rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    net = tiny_network()
    crf = MeanFieldCRF(num_classes=4, eval_iterations=3).eval()
    x = torch.rand(1, 3, 49, 49)
    raw = x * 255
    with torch.no_grad():
        eager = crf(net(x), raw)
        compiled_net = torch.compile(net)
        compiled_crf = torch.compile(crf)  # graph breaks where the lattice's sizes depend on the data
        out = compiled_crf(compiled_net(x), raw)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
