"""Host/device transfers: on the CPU nothing moves or is copied; on CUDA (tested where a
GPU is present) inputs cross in their stored dtype and results come back a chunk late."""

import pytest
import torch

from mergekit.transfer import Transfer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cpu_moves_nothing_and_narrows_results_at_once():
    transfer = Transfer(torch.device("cpu"))
    raw = torch.randn(5, 3).to(torch.bfloat16)
    assert transfer.to_device(raw) is raw  # no copy of the mapped input
    assert not transfer.asynchronous
    result = torch.randn(5, 3)
    back = transfer.to_host(result, torch.bfloat16).wait()
    assert back.dtype == torch.bfloat16 and back.device.type == "cpu"
    # round to nearest even, computed from the bits (independent of torch's cast)
    bits = result.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    assert torch.equal(back.view(torch.int16).to(torch.int64) & 0xFFFF, rounded)


@cuda
def test_cuda_inputs_cross_in_their_stored_dtype():
    transfer = Transfer(torch.device("cuda"))
    raw = torch.randn(300, 7).to(torch.bfloat16)
    on_device = transfer.to_device(raw)
    assert on_device.device.type == "cuda" and on_device.dtype == torch.bfloat16
    assert torch.equal(on_device.cpu().view(torch.int16), raw.view(torch.int16))


@cuda
def test_cuda_results_in_flight_each_arrive_whole():
    """Several results queued before any is collected: each wait gives its own values."""
    transfer = Transfer(torch.device("cuda"))
    assert transfer.asynchronous
    values = [torch.randn(2048, 512) for _ in range(4)]
    pending = [transfer.to_host(v.cuda() * 2, torch.float32) for v in values]
    for v, p in zip(values, pending):
        got = p.wait()
        assert got.device.type == "cpu" and got.is_pinned()
        assert torch.equal(got, v * 2)
