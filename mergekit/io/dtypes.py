"""safetensors dtype codes, torch dtypes and recipe dtype names."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
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
