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
    # float16's exact ties (low 13 bits 0x1000) across its normal range, and float16's
    # range edges with their neighbours
    half_ties = (torch.randint(0x38800000 >> 13, 0x47800000 >> 13, (512,), generator=g,
                               dtype=torch.int32) << 13) | 0x1000
    sign = torch.randint(0, 2, (512,), generator=g, dtype=torch.int32) << 31
    edges = torch.tensor([0x38800000, 0x477FEFFF, 0x477FF000, 0x33000000, 0x33000001,
                          0x387FFFFF, 0x387FF000, 0x7F800001, 0xFFC00000], dtype=torch.int64)
    edges = torch.cat([edges - 1, edges, edges + 1]).to(torch.int32)
    return torch.cat([x, ties.view(torch.float32), (half_ties | sign).view(torch.float32),
                      edges.view(torch.float32)])


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
    want = stored.float()
    # torch widens a float16 NaN to 0x7FFFFFFF or 0x7FC00000 by its place in the tensor
    # (scalar tail or vector body), so only NaN-ness is compared there
    nan = torch.isnan(want).numpy()
    assert np.array_equal(np.isnan(out), nan)
    assert np.array_equal(out.view(np.uint32)[~nan],
                          want.view(torch.int32).numpy().view(np.uint32)[~nan])
