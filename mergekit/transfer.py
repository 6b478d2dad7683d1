"""Moving a job's tensors between host memory and the device that does the math.

On the CPU nothing moves. On a CUDA device each input goes through a page-locked (pinned)
host buffer, so its copy to the device is asynchronous and at full bus speed (a copy from
ordinary memory is staged by the driver, synchronously), and it travels in its stored
dtype: a bfloat16 tensor crosses the bus as 2 bytes per element and is widened to float32
on the device. Results are narrowed to the output dtype on the device and come back into
pinned buffers asynchronously; the caller collects each one a step later, once the device
has moved on to the next chunk.

Pinned buffers come from torch's caching host allocator, which keeps a freed buffer from
being reused until the copies that read or wrote it have completed, so a buffer can be let
go as soon as its copy is queued.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch


class Result(Protocol):
    def wait(self) -> torch.Tensor:
        """The result in host memory, once its copy there has completed."""
        ...


class _Ready:
    def __init__(self, tensor: torch.Tensor) -> None:
        self._tensor = tensor

    def wait(self) -> torch.Tensor:
        return self._tensor


class _Copying:
    def __init__(self, tensor: torch.Tensor, done: object) -> None:
        self._tensor = tensor
        self._done = done  # a torch.cuda.Event recorded after the copy

    def wait(self) -> torch.Tensor:
        self._done.synchronize()  # type: ignore[attr-defined]
        return self._tensor


class Transfer:
    """Host-to-device and device-to-host copies for one compute device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pinned = device.type == "cuda"
        # whether ``to_host`` returns before the copy is done: then the caller does well
        # to queue the next chunk's work before it waits
        self.asynchronous = self._pinned

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (host memory, any dtype) on the device, in the same dtype."""
        if self.device.type == "cpu":
            return tensor
        if not self._pinned:
            return tensor.to(self.device)
        import torch

        staged = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        staged.copy_(tensor)
        return staged.to(self.device, non_blocking=True)

    def to_host(self, tensor: torch.Tensor, dtype: torch.dtype) -> Result:
        """``tensor`` (on the device) converted to ``dtype`` on the device and copied to host
        memory; ``wait()`` on the value returned gives it."""
        if self.device.type == "cpu":
            return _Ready(tensor.to(dtype))
        if not self._pinned:
            return _Ready(tensor.to(dtype).to("cpu"))
        import torch

        narrowed = tensor.to(dtype)
        host = torch.empty(narrowed.shape, dtype=dtype, pin_memory=True)
        host.copy_(narrowed, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))  # the stream the copy is on
        return _Copying(host, done)
