"""Storage formats of the frozen base weights (MATH.md, "Quantized base weights"): quantizers that
write a float projection in a format's checkpoint layout, and the checks of such tensors.

Each projection W [E, out, in] becomes the tuple ExpertWeights.from_quantized takes:
  int8        (codes int8 [E, out, in], scales fp32 [E, out])                    symmetric, per output row
  fp8_block   (codes float8_e4m3fn [E, out, in], scale_inv fp32 [E, ceil(out/128), ceil(in/128)])
  int4_group  (weight_packed int32 [E, out, ceil(in/8)], weight_scale [E, out, ceil(in/32)])
              compressed-tensors' pack-quantized: q in [-8, 7] stored as q + 8, element i in bits 4 (i % 8)
  mxfp4       (blocks uint8 [E, out, ceil(in/32), 16], scales E8M0 uint8 [E, out, ceil(in/32)])
              gpt-oss' layout: e2m1 codes two per byte, the lower index in the low nibble
"""
from __future__ import annotations

import math

import torch

STORAGES = ("bf16", "int8", "fp8_block", "int4_group", "mxfp4")
STORAGE_CODE = {name: i for i, name in enumerate(STORAGES)}  # kt::Storage in src/kernels/types.hpp
SCALE_TYPE_CODE = {torch.float32: 0, torch.bfloat16: 1}     # kt::ScaleType

FP8_BLOCK = 128
GROUP = 32  # int4_group and mxfp4
_FP8_MAX = 448.0
_E2M1_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def check_storage(storage) -> str:
    if storage not in STORAGES:
        raise ValueError(f"storage: expected one of {STORAGES}, got {storage!r}")
    return storage


def _pad_last(t: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = -t.shape[-1] % multiple
    return torch.nn.functional.pad(t, (0, pad)) if pad else t


def _groups(w: torch.Tensor, size: int) -> torch.Tensor:
    """[E, out, in] -> [E, out, ceil(in/size), size], zero-padded."""
    w = _pad_last(w, size)
    return w.reshape(*w.shape[:-1], w.shape[-1] // size, size)


def _safe(amax: torch.Tensor) -> torch.Tensor:
    return torch.where(amax > 0, amax, torch.ones_like(amax))


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = _safe(w.abs().amax(dim=-1)) / 127
    codes = torch.round(w / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def quantize_fp8_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    E, out, inp = w.shape
    b = FP8_BLOCK
    padded = torch.nn.functional.pad(w, (0, -inp % b, 0, -out % b))
    blocks = padded.reshape(E, padded.shape[1] // b, b, padded.shape[2] // b, b)
    scale_inv = _safe(blocks.abs().amax(dim=(2, 4))) / _FP8_MAX
    full = scale_inv.repeat_interleave(b, dim=1).repeat_interleave(b, dim=2)[:, :out, :inp]
    codes = (w / full).clamp_(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
    return codes, scale_inv


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 values [E, out, in] in [-8, 7] -> int32 [E, out, ceil(in/8)] as compressed-tensors packs them
    (element i as q + 8 in bits 4 (i % 8) of word i / 8: two per byte, little-endian words)."""
    u = _pad_last((q + 8).to(torch.uint8), 8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous().view(torch.int32)


def quantize_int4_group(w: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    g = _groups(w, GROUP)
    scale = (_safe(g.abs().amax(dim=-1)) / 7).to(scale_dtype)
    q = torch.round(g / scale.float()[..., None]).clamp_(-8, 7)
    q = q.reshape(*w.shape[:-1], -1)[..., : w.shape[-1]]
    return pack_int4(q), scale


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g = _groups(w, GROUP)
    amax = g.abs().amax(dim=-1)
    # OCP MX: shared exponent floor(log2(amax)) - 2 (e2m1's largest exponent); values beyond 6 saturate
    exp = torch.where(amax > 0, torch.floor(torch.log2(_safe(amax))) - 2, torch.full_like(amax, -127))
    exp = exp.clamp_(-127, 127)
    v = (g / torch.exp2(exp)[..., None]).clamp_(-6.0, 6.0)
    mids = (_E2M1_MAGNITUDES[1:] + _E2M1_MAGNITUDES[:-1]) / 2
    codes = torch.bucketize(v.abs(), mids).to(torch.uint8) | ((v < 0).to(torch.uint8) << 3)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exp + 127).to(torch.uint8)


def quantize(storage: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One projection [E, out, in] (any float dtype) in `storage`'s checkpoint layout, one expert at a time."""
    fn = {"int8": quantize_int8, "fp8_block": quantize_fp8_block, "int4_group": quantize_int4_group,
          "mxfp4": quantize_mxfp4}[storage]
    parts = [fn(w[e : e + 1].float()) for e in range(w.shape[0])]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# ---- checks of checkpoint tensors --------------------------------------------------------------------------------

_CODE_DTYPES = {"int8": torch.int8, "fp8_block": torch.float8_e4m3fn, "int4_group": torch.int32, "mxfp4": torch.uint8}


def _tensor(value, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value.detach().cpu()


def _name(t: torch.dtype) -> str:
    return str(t).replace("torch.", "")


def code_shape(storage: str, E: int, out: int, inp: int) -> tuple[int, ...]:
    if storage == "int4_group":
        return (E, out, math.ceil(inp / 8))
    if storage == "mxfp4":
        return (E, out, math.ceil(inp / GROUP), 16)
    return (E, out, inp)


def scale_shape(storage: str, E: int, out: int, inp: int) -> tuple[int, ...]:
    if storage == "int8":
        return (E, out)
    if storage == "fp8_block":
        return (E, math.ceil(out / FP8_BLOCK), math.ceil(inp / FP8_BLOCK))
    return (E, out, math.ceil(inp / GROUP))


def check_projection(storage: str, value, name: str, E: int, out: int, inp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of one projection, checked and made contiguous with the scales in the dtype packed."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name}: expected a tuple (codes, scales) of {storage} checkpoint tensors, got "
                        f"{type(value).__name__}{'' if not isinstance(value, (tuple, list)) else f' of {len(value)}'}")
    codes, scales = _tensor(value[0], f"{name}[0]"), _tensor(value[1], f"{name}[1]")
    if codes.dtype != _CODE_DTYPES[storage]:
        raise TypeError(f"{name}[0]: {storage} codes must be {_name(_CODE_DTYPES[storage])}, got {_name(codes.dtype)}")
    expected = code_shape(storage, E, out, inp)
    if tuple(codes.shape) != expected:
        raise ValueError(f"{name}[0]: expected shape {list(expected)} for (E, out, in) = {(E, out, inp)}, "
                         f"got {list(codes.shape)}")
    expected = scale_shape(storage, E, out, inp)
    if tuple(scales.shape) != expected:
        raise ValueError(f"{name}[1]: expected shape {list(expected)} for (E, out, in) = {(E, out, inp)}, "
                         f"got {list(scales.shape)}")
    if storage == "mxfp4":
        if scales.dtype != torch.uint8:
            raise TypeError(f"{name}[1]: mxfp4 scales must be uint8 (E8M0), got {_name(scales.dtype)}")
        if (scales == 255).any():
            raise ValueError(f"{name}[1]: E8M0 scale 255 (NaN) is not a finite scale")
    else:
        allowed = (torch.float32, torch.bfloat16, torch.float16)
        if scales.dtype not in allowed:
            raise TypeError(f"{name}[1]: scales must be float32, bfloat16 or float16, got {_name(scales.dtype)}")
        if not torch.isfinite(scales).all():
            raise ValueError(f"{name}[1]: scales must be finite")
        # int4_group keeps bf16 scales as they are (2 bytes each); everything else is packed as fp32 (exact)
        keep_bf16 = storage == "int4_group" and scales.dtype == torch.bfloat16
        scales = scales if keep_bf16 else scales.float()
    # one expert at a time: a whole-tensor test would allocate twice the codes' size
    if storage == "fp8_block" and any(((c.view(torch.uint8) & 0x7F) == 0x7F).any() for c in codes):
        raise ValueError(f"{name}[0]: float8_e4m3fn codes hold NaN")
    return codes.contiguous(), scales.contiguous()


def infer_dims(storage: str, gate, up, down) -> tuple[int, int, int]:
    """(E, H, I) from the shapes of the checkpoint tensors: out of gate is I, out of down is H."""
    dims = []
    for name, value in (("gate", gate), ("down", down)):
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise TypeError(f"{name}: expected a tuple (codes, scales) of {storage} checkpoint tensors, "
                            f"got {type(value).__name__}")
        codes = _tensor(value[0], f"{name}[0]")
        rank = 4 if storage == "mxfp4" else 3
        if codes.dim() != rank or min(codes.shape) < 1:
            raise ValueError(f"{name}[0]: expected a {rank}-D tensor [E, out, ...] of {storage} codes, "
                             f"got shape {list(codes.shape)}")
        dims.append((codes.shape[0], codes.shape[1]))
    (E, I), (_, H) = dims
    return E, H, I
