"""safetensors dtype codes, torch and numpy dtypes, recipe dtype names; exact conversions of
numpy arrays to and from float32."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

# safetensors code -> (torch attribute, bytes per element)
ST_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
# recipe / torch name -> safetensors code
NAME_TO_ST = {attr: code for code, (attr, _) in ST_DTYPES.items()}
FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def itemsize(code: str) -> int:
    return ST_DTYPES[code][1]


def torch_dtype(code: str) -> torch.dtype:
    import torch

    return getattr(torch, ST_DTYPES[code][0])


def st_code(dtype: torch.dtype) -> str:
    return NAME_TO_ST[str(dtype).removeprefix("torch.")]


# The dtypes that the numpy backend (``backends.py``) reads and writes: numpy has
# float32 and float16; bfloat16 is held as its raw 16 bits (uint16).
NUMPY_CODES = frozenset({"F32", "F16", "BF16"})
# torch writes every NaN it narrows to bfloat16 as these bits
BF16_NAN_BITS = 0xFFFF


def numpy_dtype(code: str) -> np.dtype:
    """The numpy dtype of a tensor's stored bytes (``NUMPY_CODES`` only)."""
    import numpy as np

    return np.dtype({"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[code])


def to_float32(raw: np.ndarray, code: str) -> np.ndarray:
    """The float32 values of stored bytes (as ``numpy_dtype(code)``), exactly: a new array,
    except for float32 input, returned as it is."""
    import numpy as np

    if code == "F32":
        return raw
    if code == "F16":
        return raw.astype(np.float32)
    bits = np.empty(raw.shape, np.uint32)  # bfloat16 is the high half of a float32
    bits[...] = raw  # widened, then shifted in place: faster than a casting shift
    bits <<= 16
    return bits.view(np.float32)


def from_float32(x: np.ndarray, code: str, finite: bool) -> np.ndarray:
    """float32 values narrowed to ``code`` as torch does: rounded to nearest, ties to even;
    for bfloat16 its bits, with every NaN as ``BF16_NAN_BITS``. ``finite``: ``x`` holds no
    NaN (skips looking for them)."""
    import numpy as np

    if code == "F32":
        return x
    if code == "F16":
        return _to_float16(np.ascontiguousarray(x))
    bits = np.ascontiguousarray(x).view(np.uint32)
    # add 0x7FFF, plus 1 when the lowest kept bit is set (ties go to even), and keep the
    # high half
    rounded = np.right_shift(bits, 16)
    np.bitwise_and(rounded, 1, out=rounded)
    rounded += 0x7FFF
    rounded += bits
    out = np.empty(x.shape, np.uint16)
    np.right_shift(rounded, 16, out=out, casting="unsafe")
    if not finite:
        out[np.isnan(x)] = BF16_NAN_BITS
    return out


# float32 bits whose magnitude narrows to a normal float16: from 2**-14 up to the largest
# value that rounds to 65504
_F16_NORMAL_LOW, _F16_NORMAL_HIGH = 0x38800000, 0x477FEFFF
# float32's exponent bias less float16's (127 - 15), in place in a float32's bits
_F16_REBIAS = 112 << 23


def _to_float16(x: np.ndarray) -> np.ndarray:
    """float32 to float16, rounding to nearest even, on the bits: numpy's own cast takes
    about 4.5 ns an element, this about 1.8 (``benchmarks/README.md``). Values outside
    float16's normal range (zero, subnormals, overflow, Inf, NaN) are few and go through
    numpy's cast, which gives torch's bits for all but NaN."""
    import numpy as np

    bits = x.reshape(-1).view(np.uint32)
    magnitude = np.bitwise_and(bits, 0x7FFFFFFF)
    scratch = np.subtract(magnitude, _F16_NORMAL_LOW)
    others = np.flatnonzero(scratch > _F16_NORMAL_HIGH - _F16_NORMAL_LOW)
    # add 0xFFF, plus 1 when the lowest kept bit is set (ties to even), rebias, keep 16 bits
    np.right_shift(magnitude, 13, out=scratch)
    scratch &= 1
    magnitude += scratch
    magnitude += (0xFFF - _F16_REBIAS) & 0xFFFFFFFF
    magnitude >>= 13
    np.right_shift(bits, 16, out=scratch)
    scratch &= 0x8000
    magnitude |= scratch
    out = np.empty(bits.shape, np.uint16)
    np.copyto(out, magnitude, casting="unsafe")
    if others.size:
        values = x.reshape(-1)[others]
        with np.errstate(over="ignore"):  # past float16's range is Inf, as in torch
            out[others] = values.astype(np.float16).view(np.uint16)
        nan = np.isnan(values)
        if nan.any():  # torch keeps a NaN's sign and top 9 payload bits, and sets quiet
            kept = bits[others[nan]]
            out[others[nan]] = (((kept >> 16) & 0x8000) | 0x7E00 | ((kept >> 13) & 0x1FF))
    return out.view(np.float16).reshape(x.shape)
