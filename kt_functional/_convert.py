"""Input checking and conversion shared by the public API: torch or numpy in, torch inside."""
from __future__ import annotations

import numpy as np
import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
# Codes of kt::DType in src/kernels/types.hpp.
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1}


def as_tensor(value, name: str) -> tuple[torch.Tensor, bool]:
    """Returns (tensor, came_from_numpy). numpy arrays are wrapped without a copy."""
    if isinstance(value, torch.Tensor):
        return value, False
    if isinstance(value, np.ndarray):
        try:
            return torch.from_numpy(value), True
        except TypeError as e:
            raise TypeError(f"{name}: numpy dtype {value.dtype} is not supported ({e})") from None
    raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(value).__name__}")


def check_dtype(t: torch.Tensor, name: str, allowed) -> None:
    if t.dtype not in allowed:
        names = " or ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name}: expected dtype {names}, got {str(t.dtype).replace('torch.', '')}")


def check_shape(t: torch.Tensor, name: str, expected: tuple, what: str) -> None:
    """expected holds ints or None (any size); what describes it, e.g. '[T, H] = [T, 2048]'."""
    ok = t.dim() == len(expected) and all(e is None or s == e for s, e in zip(t.shape, expected))
    if not ok:
        raise ValueError(f"{name}: expected shape {what}, got {list(t.shape)}")


def cpu_contiguous(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A detached, contiguous CPU copy in dtype (no copy when t already is one)."""
    return t.detach().to(device="cpu", dtype=dtype).contiguous()


def to_kind(t: torch.Tensor, numpy: bool, device: torch.device):
    """Returns t as the caller handed its input: numpy array, or a tensor on the input's device."""
    if numpy:
        return t.numpy()
    return t if device.type == "cpu" else t.to(device)
