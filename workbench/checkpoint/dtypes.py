"""safetensors dtype codes and their torch counterparts (torch is imported only on use)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: Bytes per element of every dtype code the safetensors format defines.
ITEMSIZE: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}

FLOAT_CODES = frozenset({"F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64"})

#: Names accepted in recipes and on the command line.
DTYPE_NAMES: dict[str, str] = {
    "float32": "F32",
    "fp32": "F32",
    "float": "F32",
    "float16": "F16",
    "fp16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float64": "F64",
    "fp64": "F64",
}

_TORCH_NAMES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "U16": "uint16",
    "I16": "int16",
    "F16": "float16",
    "BF16": "bfloat16",
    "U32": "uint32",
    "I32": "int32",
    "F32": "float32",
    "U64": "uint64",
    "I64": "int64",
    "F64": "float64",
}


def code_from_name(name: str) -> str:
    """'bfloat16' -> 'BF16'; raises ValueError for an unknown name."""
    key = name.strip().lower()
    if key in DTYPE_NAMES:
        return DTYPE_NAMES[key]
    if name.upper() in ITEMSIZE:
        return name.upper()
    raise ValueError(f"unknown dtype '{name}' (use one of: {', '.join(sorted(set(DTYPE_NAMES)))})")


def torch_name(code: str) -> str:
    """'BF16' -> 'bfloat16' (the name config.json files use)."""
    return _TORCH_NAMES[code]


def to_torch(code: str) -> "torch.dtype":
    import torch

    return getattr(torch, _TORCH_NAMES[code])


def from_torch(dtype: "torch.dtype") -> str:
    name = str(dtype).removeprefix("torch.")
    for code, torch_name in _TORCH_NAMES.items():
        if torch_name == name:
            return code
    raise ValueError(f"dtype {dtype} cannot be stored in safetensors")
