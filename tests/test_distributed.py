"""torch.distributed set-up outside torchrun: the device argument and the single-process default."""

from __future__ import annotations

import pytest
import torch

from crfrnn_deeplab.distributed import init_distributed


def test_a_single_process_gets_the_device_it_names(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed("cpu") == torch.device("cpu")


@pytest.mark.parametrize("device, shown", [
    (torch.device("cpu"), r"device device\(type='cpu'\)"),
    (None, "NoneType None"),
])
def test_a_device_that_is_not_a_string_is_named(monkeypatch, device, shown):
    # a torch.device failed with "AttributeError: 'torch.device' object has no attribute 'startswith'"
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(TypeError, match=rf"device must be a string: 'auto', 'cpu', 'cuda' or 'cuda:N', got {shown}"):
        init_distributed(device)
