"""FP8 block-quantized checkpoints, the DeepSeek-V3 / Kimi-K2 layout.

A weight ``X.weight`` is stored as ``F8_E4M3`` beside ``X.weight_scale_inv``,
F32 of shape ``(ceil(rows/128), ceil(cols/128))``, and config.json says
``quantization_config: {"quant_method": "fp8", "weight_block_size": [128, 128]}``.
Its value is ``W[i, j] * scale_inv[i // 128, j // 128]``: a 4-bit by 24-bit
significand product, exact in float64 (not always in float32), so a graft
that reads or writes FP8 works in float64.

Everything here works on one 128-row band (or any whole rows) at a time, so
memory stays bounded by 128 rows of a matrix whatever its size. Other
quantized formats are refused in one line naming the format.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import ShadowgraftError
from .header import TensorInfo

BLOCK = 128  # rows and columns per scale, the only block size shadowgraft reads
CODE = "F8_E4M3"
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_SUFFIX = "_scale_inv"
CONFIG = "config.json"

# quant_method in config.json -> how users know the format.
_FORMATS = {"gptq": "GPTQ", "awq": "AWQ", "bitsandbytes": "bitsandbytes", "mxfp4": "MXFP4",
            "compressed-tensors": "compressed-tensors", "hqq": "HQQ", "eetq": "EETQ", "quanto": "quanto",
            "aqlm": "AQLM", "exl2": "EXL2", "torchao": "torchao", "fbgemm_fp8": "fbgemm FP8"}
# Element types no float arithmetic here reads: quantized formats of their own.
_DTYPES = {"F8_E5M2": "F8_E5M2", "F8_E8M0": "MXFP (F8_E8M0 scales)", "F4": "FP4", "F6_E2M3": "FP6", "F6_E3M2": "FP6"}
_FIX = "use the bf16/fp16/fp32 release of this model (or dequantize it first)"


def scale_name(weight: str) -> str:
    """``'model.layers.0.mlp.up_proj.weight'`` -> ``'model.layers.0.mlp.up_proj.weight_scale_inv'``."""
    return weight + SCALE_SUFFIX


def scale_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The scale tensor's shape for a weight of ``shape``: one scale per 128x128 block (partial blocks too)."""
    rows, cols = shape
    return -(-rows // BLOCK), -(-cols // BLOCK)


def scales(ck) -> dict[str, TensorInfo]:
    """``{weight name: its weight_scale_inv}`` of a checkpoint; ``{}`` for a plain one.

    Every other quantized format (by config.json or by tensor names and
    dtypes) and every inconsistent FP8 pair raises a ``ShadowgraftError``
    naming the file, the tensor and the format.

    >>> scales(Checkpoint.open("deepseek-ai/DeepSeek-V3"))["model.layers.0.mlp.up_proj.weight"].shape  # doctest: +SKIP
    (144, 56)
    """
    _check_config(getattr(ck, "root", None))  # stats compares renamed views of checkpoints, which carry it too
    t = ck.tensors
    out: dict[str, TensorInfo] = {}
    for name, info in t.items():
        fmt = _format_of(name, info, t)
        if fmt:
            raise ShadowgraftError(f"{info.file}: '{name}' is stored as {fmt}, a quantized format shadowgraft cannot read; {_FIX}")
        if info.dtype == CODE:
            s = t.get(scale_name(name))
            if s is None:
                raise ShadowgraftError(f"{info.file}: '{name}' is F8_E4M3 without a '{scale_name(name)}' block scale "
                                       f"(per-tensor FP8); shadowgraft reads 128x128 block-scaled FP8 only; {_FIX}")
            if len(info.shape) != 2 or s.dtype != "F32" or tuple(s.shape) != scale_shape(info.shape):
                want = f"F32{list(scale_shape(info.shape))}" if len(info.shape) == 2 else "a 2-D weight"
                raise ShadowgraftError(f"{s.file}: '{s.name}' is {s.dtype}{list(s.shape)} for '{name}' {list(info.shape)}, "
                                       f"but 128x128 blocks need {want}; the checkpoint is not DeepSeek-style FP8, re-download it")
            out[name] = s
        elif name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in t:
            w = t[name[: -len(SCALE_SUFFIX)]]
            if w.dtype != CODE:
                raise ShadowgraftError(f"{info.file}: '{name}' scales '{w.name}', which is {w.dtype}, not F8_E4M3; "
                                       "the checkpoint is inconsistent, re-download it")
    return out


def _check_config(root: Path | None) -> None:
    if root is None or not (root / CONFIG).is_file():
        return
    try:
        cfg = json.loads((root / CONFIG).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return  # not ours to judge: the checkpoint's tensors are what is read
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if not isinstance(qc, dict):
        return
    where = root / CONFIG
    method = str(qc.get("quant_method", "")).lower()
    if method != "fp8":
        fmt = _FORMATS.get(method, repr(qc.get("quant_method")))
        raise ShadowgraftError(f"{where}: quantization_config.quant_method is {fmt}, a quantized format shadowgraft "
                               f"cannot read; {_FIX}")
    block = qc.get("weight_block_size")
    if block != [BLOCK, BLOCK]:
        raise ShadowgraftError(f"{where}: fp8 quantization with weight_block_size {json.dumps(block)}; shadowgraft reads "
                               f"[{BLOCK}, {BLOCK}] blocks only; {_FIX}")
    fmt = str(qc.get("fmt", "e4m3")).lower()
    if fmt != "e4m3":
        raise ShadowgraftError(f"{where}: fp8 quantization with fmt '{fmt}'; shadowgraft reads e4m3 only; {_FIX}")


def _format_of(name: str, info: TensorInfo, tensors: dict) -> str | None:
    """The quantized format a tensor's dtype or name gives away, if any."""
    if info.dtype in _DTYPES:
        return _DTYPES[info.dtype]
    last = name.rsplit(".", 1)[-1]
    # A qweight with its qzeros or scales: a lone integer matrix is only copied, like any integer tensor.
    if last == "qweight" and any(name[: -len(last)] + x in tensors for x in ("qzeros", "scales")):
        return "GPTQ/AWQ (qweight/qzeros/scales)"
    if last in ("absmax", "quant_map", "nested_absmax", "nested_quant_map") or ".quant_state." in name:
        return "bitsandbytes (absmax/quant_state)"
    if name.endswith("_blocks") and name[: -len("_blocks")] + "_scales" in tensors:
        return "MXFP4 (_blocks/_scales)"
    return None


def dequantized_config(path: Path) -> str:
    """The text of config.json at ``path`` without ``quantization_config``, for a checkpoint written in plain floats."""
    try:
        cfg = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        cfg = None
    if not isinstance(cfg, dict):
        raise ShadowgraftError(f"{path}: not a JSON object, so its quantization_config cannot be removed for a "
                               "dequantized output; fix the file, or pass --dtype auto to keep FP8")
    cfg.pop("quantization_config", None)
    return json.dumps(cfg, indent=2, ensure_ascii=False) + "\n"


# -- arithmetic on whole rows --------------------------------------------------


def band(shape: tuple[int, ...]) -> int:
    """Elements in one 128-row band of a matrix: the unit FP8 items are read, computed and written in."""
    return BLOCK * max(shape[-1], 1)


def scale_span(shape: tuple[int, ...], start: int, n: int) -> tuple[int, int]:
    """``(first element, count)`` of the scale rows covering weight elements ``[start, start + n)`` (whole rows)."""
    cols = shape[-1]
    r0, r1 = start // cols, (start + n + cols - 1) // cols
    s0, s1 = r0 // BLOCK, max(r1 - 1, r0) // BLOCK + 1
    sc = -(-cols // BLOCK)
    return s0 * sc, (s1 - s0) * sc


def _blocks(v: torch.Tensor, cols: int):
    """``(view, slice of scale columns)`` pieces of a ``(rows, cols)`` view, one per kind of column block.

    Full 128-column blocks come as one ``(rows, k, 128)`` view, so one
    broadcast op serves them all; a last partial block comes alone.
    """
    k = cols // BLOCK
    if k:
        yield v[:, : k * BLOCK].unflatten(1, (k, BLOCK)), slice(0, k)
    if cols % BLOCK:
        yield v[:, k * BLOCK:].unsqueeze(1), slice(k, k + 1)


def _per_band(x: torch.Tensor, s: torch.Tensor, cols: int, start: int):
    """Pairs ``(rows view, its scale row)`` for flat elements ``x`` starting at element ``start`` (whole rows)."""
    v = x.view(-1, cols)
    r0 = start // cols
    sc = s.view(-1, -(-cols // BLOCK))
    r = r0
    while r < r0 + v.shape[0]:
        end = min((r // BLOCK + 1) * BLOCK, r0 + v.shape[0])
        yield v[r - r0: end - r0], sc[r // BLOCK - r0 // BLOCK]
        r = end


def dequantize_(x: torch.Tensor, s: torch.Tensor, cols: int, start: int) -> torch.Tensor:
    """Multiply, in place, the upcast FP8 elements ``x`` (flat, whole rows from element ``start``) by their block scales.

    ``s`` holds the scale rows from ``scale_span``. In float64 the result is
    exact; in float32 it is the exact product rounded once.

    >>> x = torch.ones(2 * 130); dequantize_(x, torch.tensor([2.0, 3.0]), 130, 0)[[0, 129]].tolist()
    [2.0, 3.0]
    """
    if x.numel():
        for rows, srow in _per_band(x, s, cols, start):
            for view, cut in _blocks(rows, cols):
                view.mul_(srow[cut].to(x.dtype).view(1, -1, 1))
    return x


def quantize_band_(x: torch.Tensor, cols: int, out: torch.Tensor, scale: torch.Tensor, work: torch.Tensor) -> None:
    """Requantize one band: ``out`` (float8_e4m3fn) and ``scale`` (F32, one row) from float64 values ``x``.

    Per 128x128 block, ``scale = amax(|x|) / 448`` rounded to F32 (DeepSeek's
    ``weight_quant`` rule), and each value is ``x / scale`` rounded to the
    nearest e4m3, ties to even. An all-zero block gets scale 1 and zeros
    (DeepSeek's kernel would divide 0 by 0 there), and so does a block
    whose scale underflows F32. ``work`` is float64
    scratch the size of ``x``; ``x`` itself is left as it is.
    """
    if not x.numel():
        return
    a = torch.abs(x, out=work).view(-1, cols)
    for view, cut in _blocks(a, cols):
        scale[cut] = view.amax(dim=(0, 2)).div_(E4M3_MAX).to(torch.float32)
    scale.masked_fill_(scale == 0, 1.0)
    work.copy_(x)
    for view, cut in _blocks(work.view(-1, cols), cols):
        view.div_(scale[cut].to(work.dtype).view(1, -1, 1))
    round_e4m3_(work)
    out.copy_(work)


def round_e4m3_(x: torch.Tensor) -> torch.Tensor:
    """Round float64 ``x`` in place to the nearest float8_e4m3fn value, ties to even, saturating at +-448.

    Done here rather than by the dtype cast, so the result does not depend
    on how a torch build converts float64 (possibly through float32, which
    would round twice): for ``|x|`` in ``[2^e, 2^(e+1))`` the e4m3 spacing is
    ``2^(e-3)``, never finer than the subnormal ``2^-9``; scaling by powers
    of two is exact, and ``round`` is half-to-even.
    """
    _, e = torch.frexp(x)  # x = m * 2^e, 0.5 <= |m| < 1, so the spacing is 2^(e-4)
    step = torch.exp2(e.sub_(4).clamp_(min=-9).to(x.dtype))
    x.div_(step).round_().mul_(step)
    return x.clamp_(-E4M3_MAX, E4M3_MAX)

