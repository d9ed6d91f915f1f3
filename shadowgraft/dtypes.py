"""safetensors dtype codes <-> torch dtypes, for the dtypes we compute on."""

from __future__ import annotations

import torch

from .errors import ShadowgraftError

_TORCH = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    # Block-scaled FP8 weights (fp8.py): read raw here, dequantized with their scales.
    "F8_E4M3": torch.float8_e4m3fn,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_CODE = {v: k for k, v in _TORCH.items()}
# What users type after --dtype.
NAMES = {"float32": "F32", "fp32": "F32", "float16": "F16", "fp16": "F16", "bfloat16": "BF16", "bf16": "BF16", "float64": "F64"}


def torch_dtype(code: str) -> torch.dtype:
    try:
        return _TORCH[code]
    except KeyError:
        raise ShadowgraftError(f"dtype {code} has no torch equivalent here; exclude the tensor or copy it unchanged") from None


def code_of(dtype: torch.dtype) -> str:
    return _CODE[dtype]


def parse_dtype(text: str) -> str | None:
    """``"auto"`` -> None (keep instruct's dtype), ``"bfloat16"`` -> ``"BF16"``."""
    if text == "auto":
        return None
    try:
        return NAMES[text.lower()]
    except KeyError:
        raise ShadowgraftError(f"unknown dtype '{text}'; use auto, bfloat16, float16 or float32") from None
