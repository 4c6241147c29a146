"""Input checking and conversion shared by the public API: torch or numpy in, torch inside."""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
# Codes of kt::DType in src/kernels/types.hpp.
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1}
FP32_MAX = float(torch.finfo(torch.float32).max)
MAX_THREADS = 1024


def as_tensor(value, name: str) -> tuple[torch.Tensor, bool]:
    """Returns (tensor, came_from_numpy): a dense tensor that holds data. numpy arrays are wrapped
    without a copy, except those with negative strides or a non-native byte order (copied)."""
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.is_nested:
            layout = "nested" if value.is_nested else str(value.layout).replace("torch.", "")
            raise TypeError(f"{name}: expected a dense (strided) tensor, got a {layout} tensor")
        if value.is_meta:
            raise ValueError(f"{name}: expected a tensor that holds data, got a meta tensor")
        return value, False
    if isinstance(value, np.ndarray):
        if not value.dtype.isnative:
            value = value.astype(value.dtype.newbyteorder("="))
        if any(s < 0 for s in value.strides):
            value = np.ascontiguousarray(value)
        try:
            return torch.from_numpy(value), True
        except TypeError as e:
            raise TypeError(f"{name}: numpy dtype {value.dtype} is not supported ({e})") from None
    raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(value).__name__}")


def check_int(value, name: str, lo: int, hi: int) -> int:
    """value as an int in [lo, hi] (bool is not an int here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int in {lo}..{hi}, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name}: expected an int in {lo}..{hi}, got {value}")
    return int(value)


def check_threads(threads, name: str = "threads") -> int:
    """A worker-thread count: an int in 1..MAX_THREADS."""
    return check_int(threads, name, 1, MAX_THREADS)


def check_alpha(alpha, rank: int | None, name: str = "alpha") -> float:
    """The LoRA alpha as a float: finite, with a scale alpha / rank that fits in fp32 (the kernels' type)."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {alpha!r}")
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"{name}: expected a finite number, got {alpha}")
    if rank is not None and abs(alpha / rank) > FP32_MAX:
        raise ValueError(f"{name}: the LoRA scale {name} / rank = {alpha / rank:g} overflows float32 "
                         f"(at most {FP32_MAX:g})")
    return alpha


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
