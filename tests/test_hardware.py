"""Device and precision choice, with CUDA and MPS availability patched (neither can run here)."""
import pytest
import torch

import hardware


@pytest.mark.parametrize("cuda,mps,expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert hardware.pick_device("auto").type == expected
    if cuda:
        assert hardware.pick_device("cuda").type == "cuda"


def test_precision_choice(monkeypatch):
    cpu = torch.device("cpu")
    assert hardware.pick_precision("fp32", cpu) is None
    assert hardware.pick_precision("bf16", cpu) is torch.bfloat16
    for faster in (True, False):  # auto follows the measurement
        monkeypatch.setattr(hardware, "bf16_is_faster", lambda device: faster)
        assert hardware.pick_precision("auto", cpu) is (torch.bfloat16 if faster else None)
        assert hardware.pick_precision("auto", torch.device("mps")) is None  # fp32 only on MPS, whatever it measures
        assert hardware.pick_precision("auto", torch.device("cuda")) is None  # and on CUDA (launch-bound there)
