"""numpy conversions to and from float32 give torch's bits: rounding to nearest even,
overflow to Inf, subnormals, NaN."""

import numpy as np
import pytest
import torch

from mergekit.io.dtypes import from_float32, numpy_dtype, to_float32

TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def special_values() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.randn(4096, generator=g) * 10.0 ** torch.randint(-40, 39, (4096,), generator=g),
        torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), -float("nan"),
                      3.4e38, -3.39e38, 65504.0, 65520.0, 1e-45, 1e-40, 6e-8, 1e-8]),
    ])
    # exact ties between two bfloat16 values (low 16 bits 0x8000), odd and even below them
    ties = (torch.randint(0, 1 << 15, (512,), generator=g, dtype=torch.int32) << 16) | 0x8000
    return torch.cat([x, ties.view(torch.float32)])


@pytest.mark.parametrize("code", ["BF16", "F16", "F32"])
def test_from_float32_rounds_as_torch(code):
    x = special_values()
    expected = x.to(TORCH[code])
    for finite in (False, True):
        values = x if not finite else x[torch.isfinite(x)]
        out = from_float32(values.numpy(), code, finite)
        assert out.dtype == numpy_dtype(code)
        want = (expected if not finite else expected[torch.isfinite(x)])
        assert np.array_equal(out.view(np.uint8), want.view(torch.uint8).numpy()), code


@pytest.mark.parametrize("code", ["BF16", "F16", "F32"])
def test_to_float32_is_exact(code):
    stored = special_values().to(TORCH[code])
    raw = stored.view(torch.uint8).numpy().view(numpy_dtype(code))
    out = to_float32(raw, code)
    assert out.dtype == np.float32
    assert np.array_equal(out.view(np.uint32), stored.float().view(torch.int32).numpy().view(
        np.uint32))
