"""Codecs for the intermediate tensors a board sends to a peer (issue 23, item 6).

BPS compresses the tensor at the split with a compressor it calls FF; only its abstract could be
read (shared/PAPERS.md), so the codecs here are our own design, not a reproduction of FF. What they
rely on: a split tensor is float32 NCHW, taken after a ReLU (many exact zeros, nothing negative),
and the tail is a trained network that tolerates a quantisation step well below the spread of a
channel. Every codec is vectorised numpy: no Python loop over elements, one pass per step, and
few numpy calls (at batch 1 their fixed cost is a good part of the time). Which codec suits which
split point and link is for the split policy to choose from ``edge-agent bench codecs``.

A codec's name is what goes in the wire tensor's ``codec`` field (DESIGN.md: a tensor is
``{dtype, shape, data, codec?}``). ``dtype`` and ``shape`` are those of the decoded tensor (always
float32), ``data`` is the codec's payload. A name is a base codec, optionally followed by a
lossless stage: ``int8``, ``int8+zstd``, ``sparse8+lz4``, ``raw+zlib``...

Base codecs and the bound ``decode(encode(x))`` keeps (tests check each with hypothesis):

``raw``
    float32 little-endian, as is. Lossless, bit for bit: NaN, inf and -0.0 included.
``fp16``
    IEEE half precision. For ``|x| < 65520``: ``|d - x| <= max(2**-11 * |x|, 2**-25)`` (round to
    nearest; the second term covers half's subnormals). ``|x| >= 65520`` becomes ``±inf``; NaN stays
    NaN and ``±inf`` stays ``±inf``.
``int8``
    8-bit affine quantisation per channel (axis 1 of NCHW; a tensor of rank < 2 is one channel),
    the scale and zero point shared by the batch. Affine rather than symmetric: a post-ReLU channel
    spans ``[0, max]``, where a symmetric code spends its sign bit on values that never occur and
    so has half the resolution; affine uses all 256 levels for ``[min(lo, 0), max(hi, 0)]``. The
    range always holds 0 and the zero point is an integer, so 0 decodes to exactly 0.0 (the ReLU's
    zeros stay zeros, and ``sparse8`` can drop them). With ``scale_c = (max(hi_c, 0) - min(lo_c, 0))
    / 255`` (raised to float32's smallest normal where smaller: an all-zero channel has that step
    and decodes to exact zeros): ``|d - x| <= 1.001 * scale_c``; half a step where the channel's
    minimum is 0 (the post-ReLU case), one step at worst where rounding the zero point moves the
    range (the 0.001 covers float32 rounding). NaN or inf cannot be quantised: :func:`encode` raises ``CodecError`` naming the channel (send ``raw`` or
    ``fp16`` then).
``int4``
    ``int8`` with 16 levels (``/ 15`` in place of ``/ 255`` in its bound), two codes a byte: about
    8x smaller than float32 whatever the sparsity, for tensors that are not post-ReLU (a
    MobileNetV2 block's linear bottleneck output has no zeros to leave out) or links too slow for
    ``sparse8``. Coarser, so the benchmark's top-1 change says where it is good enough.
``sparse8``
    ``int8``'s code, with the entries equal to the channel's zero point (the exact zeros, and
    values within half a step of 0) left out: a bitmap of the others (one bit per element) then
    their codes. Decodes bit for bit as ``int8`` does, so the same bound; smaller than ``int8``
    wherever more than 1/8 of the entries are 0, which a post-ReLU tensor has.

Lossless stages (on the base payload): ``+zstd`` (zstandard, level 1), ``+lz4`` (LZ4 block),
``+zlib`` (the standard library's deflate, level 6: the baseline of the BPS anchor; ``raw+zlib`` is
"zlib on float32"). A stage whose module is not installed is not registered: ``available_codecs()``
lists what this agent can decode, for its status.

Payload layouts (little-endian, ``n`` elements, ``C`` channels):

* ``raw``: ``n`` float32. ``fp16``: ``n`` float16.
* ``int8``: ``C`` float32 scales, ``C`` uint8 zero points, ``n`` uint8 codes (C order).
* ``int4``: as ``int8``, with ``ceil(n / 2)`` bytes of codes: element ``2i`` in the high nibble of
  byte ``i``, ``2i + 1`` in the low one (0 after an odd last element).
* ``sparse8``: as ``int8``'s first two, then ``ceil(n / 8)`` bytes of bitmap (``np.packbits``
  order: element 0 is the most significant bit of byte 0), then one uint8 code per set bit.

Hostile payloads: :meth:`EncodedTensor.from_wire` and :func:`decode` check every field and every
size against the shape before allocating anything; decoded size is capped by ``max_bytes``
(default :data:`MAX_DECODED_BYTES`), a lossless stage is decompressed into at most the largest
payload the shape allows, and a problem raises :class:`CodecError` (a ``ValueError``) with
``field`` naming it. A shape of ``[2**40]`` is refused by arithmetic, not by a ``MemoryError``.
"""
from __future__ import annotations

import math
import threading
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

try:
    import zstandard as _zstd
except ImportError:  # an optional dependency: the +zstd codecs are then not offered
    _zstd = None
try:
    import lz4.block as _lz4
except ImportError:
    _lz4 = None

__all__ = [
    "CODECS", "Codec", "CodecError", "EncodedTensor", "MAX_DECODED_BYTES", "MAX_RANK",
    "available_codecs", "decode", "encode",
]

#: The largest tensor :func:`decode` produces unless told otherwise (float32 bytes): an intermediate
#: tensor of a batch is a few MiB; 256 MiB leaves room and still stops a hostile shape.
MAX_DECODED_BYTES = 256 << 20
#: Tensors of higher rank are refused (NCHW is 4; a hostile shape of 10**6 dims costs nothing then).
MAX_RANK = 8
WIRE_DTYPE = "float32"
_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")
_U8 = np.dtype(np.uint8)
_TINY = float(np.finfo(np.float32).tiny)
_F32_MAX = float(np.finfo(np.float32).max)
_NEAR_MAX_SCALE = _F32_MAX / 512
_WIRE_KEYS = frozenset(("dtype", "shape", "data", "codec"))
_ZSTD_LEVEL = 1
_ZLIB_LEVEL = 6


class CodecError(ValueError):
    """An encoded tensor that cannot be decoded (or an array that cannot be encoded by the codec).

    ``field`` is the wire field at fault (``shape``, ``data``, ``codec``, ``dtype``), so the peer's
    handler can answer ``invalid_input`` with it.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Codec:
    """One registered codec: its wire name, its parts, and whether it loses information."""

    name: str
    base: str          # raw | fp16 | int8 | sparse8
    stage: str | None  # zstd | lz4 | zlib | None
    lossy: bool
    bound: str         # the round-trip bound, in words (the module docstring has the details)


@dataclass(frozen=True, slots=True)
class EncodedTensor:
    """A float32 tensor in a codec's form: what travels in a wire tensor's map.

    ``data`` is bytes-like (the encoder hands a ``bytearray`` to avoid a copy; msgpack sends both).
    """

    codec: str
    shape: tuple[int, ...]
    data: bytes | bytearray | memoryview

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def ratio(self) -> float:
        """Size of the float32 tensor over the size of this one (inf for an empty payload)."""
        raw = 4 * math.prod(self.shape)
        return raw / len(self.data) if len(self.data) else math.inf

    def to_wire(self) -> dict[str, Any]:
        """The wire tensor map: ``{dtype, shape, data, codec}`` (``codec`` left out for ``raw``)."""
        wire: dict[str, Any] = {"dtype": WIRE_DTYPE, "shape": list(self.shape), "data": self.data}
        if self.codec != "raw":
            wire["codec"] = self.codec
        return wire

    @classmethod
    def from_wire(cls, wire: Any, max_bytes: int = MAX_DECODED_BYTES) -> "EncodedTensor":
        """Check a wire tensor map's fields (not yet the payload's inner sizes: :func:`decode` does).

        Raises :class:`CodecError` naming the field: not a map, unknown keys, a dtype other than
        float32, a shape that is not a list of non-negative ints or whose tensor exceeds
        ``max_bytes``, an unknown codec, data that is not bytes or whose length cannot match.
        """
        if not isinstance(wire, Mapping):
            raise CodecError("tensor", f"expected a map with {sorted(_WIRE_KEYS)}, got {type(wire).__name__}")
        extra = [k for k in wire if k not in _WIRE_KEYS]
        if extra:
            raise CodecError(str(extra[0]), f"unknown field; a tensor has {sorted(_WIRE_KEYS)}")
        for key in ("dtype", "shape", "data"):
            if key not in wire:
                raise CodecError(key, "missing")
        if wire["dtype"] != WIRE_DTYPE:
            raise CodecError("dtype", f"{wire['dtype']!r}: expected {WIRE_DTYPE!r} (the codecs carry float32)")
        codec = wire.get("codec", "raw")
        if codec is None:
            codec = "raw"
        _lookup(codec)
        shape = _check_shape(wire["shape"], max_bytes)
        data = wire["data"]
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise CodecError("data", f"expected bytes, got {type(data).__name__}")
        if isinstance(data, memoryview) and (data.ndim != 1 or data.itemsize != 1):
            data = data.cast("B")
        encoded = cls(codec, shape, data)
        _check_payload_length(encoded)
        return encoded


def _check_shape(shape: Any, max_bytes: int) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)):
        raise CodecError("shape", f"expected a list of ints, got {type(shape).__name__}")
    if len(shape) > MAX_RANK:
        raise CodecError("shape", f"rank {len(shape)}: at most {MAX_RANK} dimensions")
    dims = []
    for i, dim in enumerate(shape):
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
            raise CodecError("shape", f"dimension {i} is {dim!r}: expected an int >= 0")
        if dim < 0:
            raise CodecError("shape", f"dimension {i} is {dim}: expected an int >= 0")
        dims.append(int(dim))
    # Python ints: the product cannot overflow, so [2**40] is refused here and never allocated.
    nbytes = 4 * math.prod(dims)
    if nbytes > max_bytes:
        raise CodecError("shape", f"{dims}: {nbytes} bytes of float32, over the limit of {max_bytes}")
    return tuple(dims)


# --- registry --------------------------------------------------------------------------------

_BASES = {
    "raw": (False, "exact, bit for bit (NaN and inf kept)"),
    "fp16": (True, "|d-x| <= max(2**-11 |x|, 2**-25) for |x| < 65520; larger -> inf; NaN/inf kept"),
    "int8": (True, "|d-x| <= 1.001 * scale_c, scale_c = (max(hi_c,0) - min(lo_c,0)) / 255 per channel; "
                   "NaN/inf refused"),
    "int4": (True, "|d-x| <= 1.001 * scale_c, scale_c = (max(hi_c,0) - min(lo_c,0)) / 15 per channel; "
                   "NaN/inf refused"),
    "sparse8": (True, "decodes as int8 does (same bound); zero-point entries left out by a bitmap; "
                      "NaN/inf refused"),
}
_STAGES: dict[str, bool] = {"zstd": _zstd is not None, "lz4": _lz4 is not None, "zlib": True}


def _make_registry() -> dict[str, Codec]:
    registry: dict[str, Codec] = {}
    for base, (lossy, bound) in _BASES.items():
        registry[base] = Codec(base, base, None, lossy, bound)
        for stage, present in _STAGES.items():
            if present:
                name = f"{base}+{stage}"
                registry[name] = Codec(name, base, stage, lossy, bound + f"; then {stage} (lossless)")
    return registry


#: Every codec this agent can encode and decode, by wire name.
CODECS: Mapping[str, Codec] = _make_registry()


#: What each base codec makes of float32 at the least (its header aside); a lossless stage and
#: sparsity only add to it. What a board prices an option with before it has measured its sends.
NOMINAL_RATIO = {"raw": 1.0, "fp16": 2.0, "int8": 4.0, "int4": 8.0, "sparse8": 4.0}


def nominal_ratio(codec: str) -> float:
    """The size reduction ``codec`` promises at the least (:data:`NOMINAL_RATIO`)."""
    return NOMINAL_RATIO.get(_lookup(codec).base, 1.0)


def available_codecs() -> list[str]:
    """The codec names this agent accepts (for the status it publishes to peers)."""
    return list(CODECS)


def _lookup(name: Any) -> Codec:
    if not isinstance(name, str):
        raise CodecError("codec", f"expected a string, got {type(name).__name__}")
    codec = CODECS.get(name)
    if codec is None:
        base, _, stage = name.partition("+")
        if base in _BASES and stage in _STAGES and not _STAGES[stage]:
            raise CodecError("codec", f"{name!r}: the {stage} stage is not installed on this agent")
        raise CodecError("codec", f"{name!r}: unknown; expected one of {sorted(CODECS)}")
    return codec


# --- the per-channel quantiser shared by int8 and sparse8 ---------------------------------------

def _channels(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(batch, channels, rest) of a shape: NCHW's axis 1 is the channel; rank < 2 is one channel."""
    if len(shape) >= 2:
        return shape[0], shape[1], math.prod(shape[2:])
    return 1, 1, math.prod(shape)


def _quant_params(x3: np.ndarray, levels: int = 255) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel ``(scale, zero_point, inv_scale, bias)`` of ``x3`` [N, C, R] (``int8`` above).

    ``scale`` (float32) and ``zero_point`` (uint8) go on the wire; the code of ``x`` is
    ``trunc(x * inv_scale + bias)``, ``bias`` being ``zero_point + 0.5`` (round half up), lowered
    for a channel whose maximum would otherwise reach 256 after float rounding. At batch 1 the
    per-call overhead of numpy dominates, so this makes few calls.
    """
    channels = x3.shape[1]
    if x3.size == 0:
        zeros = np.zeros(channels, _F32)
        return zeros, np.zeros(channels, _U8), zeros, zeros
    lo = x3.min(axis=2)                 # NaN propagates through min/max: the check below sees it
    hi = x3.max(axis=2)
    if x3.shape[0] > 1:
        lo, hi = lo.min(axis=0), hi.max(axis=0)
    else:
        lo, hi = lo[0], hi[0]
    # float64 sums cannot overflow on finite float32 values; NaN and inf make them non-finite
    if not math.isfinite(lo.sum(dtype=np.float64) + hi.sum(dtype=np.float64)):
        c = int(np.flatnonzero(~(np.isfinite(lo) & np.isfinite(hi)))[0])
        raise CodecError("data", f"channel {c} holds NaN or inf, which an 8-bit code cannot carry; "
                                 "send it as raw or fp16")
    lo64 = np.minimum(lo, 0.0, dtype=np.float64)
    span = np.maximum(hi, 0.0, dtype=np.float64) - lo64    # float64: cannot overflow
    # At least float32's smallest normal: 1/scale stays finite, and an all-zero channel gets
    # scale tiny, zero point 0, so its zeros still decode to exactly 0.0.
    scale = np.maximum(span * (1.0 / levels), _TINY).astype(_F32)
    zero_point = np.rint(np.clip(-lo64 / scale, 0.0, levels)).astype(_U8)
    inv = np.divide(np.float32(1.0), scale, dtype=_F32)
    bias = zero_point + np.float32(0.5)
    # The same float32 operations as on the elements, so monotone: no element of the channel
    # can exceed top, and the cast to uint8 of a value >= 256 would be undefined.
    top = hi * inv + bias
    over = top >= np.float32(levels + 0.75)
    if over.any():
        bias[over] -= top[over] - np.float32(levels + 0.5)
    return scale, zero_point, inv, bias


def _quantise(x3: np.ndarray, inv: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Codes of ``x3`` (uint8, same shape): trunc(x * inv + bias), in [0, levels]."""
    t = np.multiply(x3, inv[:, None], dtype=_F32)
    t += bias[:, None]
    return t.astype(_U8)    # truncates toward 0 (t > -1 and < 256); faster than copyto into a view


def _dequantise(q3: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """float32 of codes ``q3`` [N, C, R]: (q - zp) * scale, so q == zp gives exactly 0.0."""
    if zero_point.any():
        out = np.subtract(q3, zero_point.astype(_F32)[None, :, None], dtype=_F32)
    else:                   # post-ReLU: every zero point 0, one pass fewer
        out = q3.astype(_F32)
    if scale.size and scale.max() > _NEAR_MAX_SCALE:
        # A channel spanning nearly all of float32: its top code may round past the largest
        # float32. Keep it finite (a rare path: activations are nowhere near 1e36).
        with np.errstate(over="ignore"):
            out *= scale[None, :, None]
        np.clip(out, -_F32_MAX, _F32_MAX, out=out)
    else:
        out *= scale[None, :, None]
    return out


# --- encoders --------------------------------------------------------------------------------

def _encode_raw(x: np.ndarray) -> bytes:
    return x.astype(_F32, copy=False).tobytes()


def _encode_fp16(x: np.ndarray) -> bytes:
    with np.errstate(over="ignore"):    # |x| >= 65520 -> inf, as documented
        return x.astype(_F16).tobytes()


def _encode_int8(x: np.ndarray) -> bytearray:
    n, c, r = _channels(x.shape)
    x3 = x.reshape(n, c, r)
    scale, zero_point, inv, bias = _quant_params(x3)
    buf = bytearray(5 * c + x.size)
    view = np.frombuffer(buf, _U8)
    view[: 4 * c] = scale.view(_U8)
    view[4 * c: 5 * c] = zero_point
    view[5 * c:] = _quantise(x3, inv, bias).reshape(-1)
    return buf


def _encode_int4(x: np.ndarray) -> bytearray:
    n, c, r = _channels(x.shape)
    x3 = x.reshape(n, c, r)
    scale, zero_point, inv, bias = _quant_params(x3, levels=15)
    q = _quantise(x3, inv, bias).reshape(-1)
    buf = bytearray(5 * c + (x.size + 1) // 2)
    view = np.frombuffer(buf, _U8)
    view[: 4 * c] = scale.view(_U8)
    view[4 * c: 5 * c] = zero_point
    packed = view[5 * c:]
    half = x.size // 2
    np.left_shift(q[0: 2 * half: 2], 4, out=packed[:half])     # element 2i: the high nibble
    packed[:half] |= q[1: 2 * half: 2]
    if x.size % 2:
        packed[half] = q[-1] << 4
    return buf


def _encode_sparse8(x: np.ndarray) -> bytearray:
    n, c, r = _channels(x.shape)
    x3 = x.reshape(n, c, r)
    scale, zero_point, inv, bias = _quant_params(x3)
    q3 = _quantise(x3, inv, bias)
    keep = q3 != zero_point[None, :, None]
    bitmap = np.packbits(keep, axis=None)
    kept = int(np.count_nonzero(keep))
    head = 5 * c + bitmap.size
    buf = bytearray(head + kept)
    view = np.frombuffer(buf, _U8)
    view[: 4 * c] = scale.view(_U8)
    view[4 * c: 5 * c] = zero_point
    view[5 * c: head] = bitmap
    np.compress(keep.reshape(-1), q3.reshape(-1), out=view[head:])
    return buf


_ENCODERS: dict[str, Callable[[np.ndarray], bytes | bytearray]] = {
    "raw": _encode_raw, "fp16": _encode_fp16, "int8": _encode_int8, "int4": _encode_int4,
    "sparse8": _encode_sparse8,
}

_local = threading.local()


def _zstd_compressor() -> Any:
    comp = getattr(_local, "zstd_c", None)
    if comp is None:    # a ZstdCompressor is not safe to share between threads: one per thread
        comp = _local.zstd_c = _zstd.ZstdCompressor(level=_ZSTD_LEVEL)
    return comp


def _zstd_decompressor() -> Any:
    dec = getattr(_local, "zstd_d", None)
    if dec is None:
        dec = _local.zstd_d = _zstd.ZstdDecompressor()
    return dec


def _compress(stage: str, payload: bytes | bytearray) -> bytes:
    if stage == "zstd":
        return _zstd_compressor().compress(payload)
    if stage == "lz4":
        return _lz4.compress(payload, store_size=False)
    return zlib.compress(payload, _ZLIB_LEVEL)


def encode(array: np.ndarray, codec: str) -> EncodedTensor:
    """``array`` (float32, or any float dtype, converted) in the codec ``codec``.

    Raises :class:`CodecError` for an unknown codec, a non-float array, a rank over
    :data:`MAX_RANK`, or NaN/inf given to an 8-bit codec.
    """
    spec = _lookup(codec)
    x = np.asarray(array)
    if x.dtype.kind != "f":
        raise CodecError("dtype", f"{x.dtype}: the codecs take float tensors")
    if x.ndim > MAX_RANK:
        raise CodecError("shape", f"rank {x.ndim}: at most {MAX_RANK} dimensions")
    x = np.asarray(x, dtype=_F32, order="C")    # (ascontiguousarray would make a scalar rank 1)
    payload = _ENCODERS[spec.base](x)
    if spec.stage is not None:
        payload = _compress(spec.stage, payload)
    return EncodedTensor(spec.name, tuple(int(d) for d in x.shape), payload)


# --- decoders --------------------------------------------------------------------------------

_HALF_TABLE: np.ndarray | None = None


def _half_table() -> np.ndarray:
    """float32 of every float16 bit pattern (256 KiB, made on first use): a gather through it
    decodes fp16 several times faster than numpy's float16 -> float32 cast, bit for bit the same."""
    global _HALF_TABLE
    if _HALF_TABLE is None:
        _HALF_TABLE = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    return _HALF_TABLE


def _payload_bounds(base: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """The least and the most bytes a base payload of this shape can have."""
    size = math.prod(shape)
    if base == "raw":
        return 4 * size, 4 * size
    if base == "fp16":
        return 2 * size, 2 * size
    channels = _channels(shape)[1]
    if base == "int8":
        return 5 * channels + size, 5 * channels + size
    if base == "int4":
        return 5 * channels + (size + 1) // 2, 5 * channels + (size + 1) // 2
    head = 5 * channels + (size + 7) // 8
    return head, head + size


def _check_payload_length(encoded: EncodedTensor) -> None:
    spec = _lookup(encoded.codec)
    if spec.stage is not None:
        return      # the compressed length says nothing; the decompressed one is checked in decode
    least, most = _payload_bounds(spec.base, encoded.shape)
    size = len(encoded.data)
    if not least <= size <= most:
        expected = f"{least}" if least == most else f"{least} to {most}"
        raise CodecError("data", f"{size} bytes: a {spec.name} tensor of shape {list(encoded.shape)} "
                                 f"has {expected}")


def _decompress(stage: str, data: bytes | bytearray | memoryview, most: int) -> bytes:
    """Decompress into at most ``most`` bytes (the largest payload the shape allows), never more."""
    try:
        if stage == "zstd":
            declared = _zstd.frame_content_size(data)
            if declared > most:     # the frame's own header would make zstd allocate that much
                raise CodecError("data", f"the zstd frame declares {declared} bytes, over the {most} "
                                         "this shape allows")
            return _zstd_decompressor().decompress(data, max_output_size=max(most, 1))
        if stage == "lz4":
            if most == 0:
                if len(data) == 1 and bytes(data) == b"\x00":    # LZ4's encoding of nothing
                    return b""
                raise CodecError("data", "an lz4 block of an empty tensor holds one zero byte")
            return _lz4.decompress(data, uncompressed_size=most)
        dec = zlib.decompressobj()
        out = dec.decompress(data, most + 1)
        if len(out) > most or dec.unconsumed_tail or not dec.eof or dec.unused_data:
            raise CodecError("data", f"not one complete zlib stream of at most {most} bytes")
        return out
    except CodecError:
        raise
    except Exception as exc:  # zstd.ZstdError, LZ4BlockError, zlib.error: a corrupt stream
        raise CodecError("data", f"corrupt {stage} stream: {exc}") from None


def decode(encoded: EncodedTensor, max_bytes: int = MAX_DECODED_BYTES) -> np.ndarray:
    """The float32 tensor back (``raw`` gives a read-only view of ``encoded.data``, no copy).

    Every size is checked against the shape before anything is allocated; a malformed payload
    raises :class:`CodecError` naming the field.
    """
    spec = _lookup(encoded.codec)
    shape = _check_shape(list(encoded.shape), max_bytes)
    data = encoded.data
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError("data", f"expected bytes, got {type(data).__name__}")
    least, most = _payload_bounds(spec.base, shape)
    if spec.stage is not None:
        data = _decompress(spec.stage, data, most)
    size = len(data) if not isinstance(data, memoryview) else data.nbytes
    if not least <= size <= most:
        expected = f"{least}" if least == most else f"{least} to {most}"
        raise CodecError("data", f"{size} bytes after {spec.stage or 'no'} decompression: a {spec.base} "
                                 f"tensor of shape {list(shape)} has {expected}")
    if spec.base == "raw":
        return np.frombuffer(data, _F32).astype(np.float32, copy=False).reshape(shape)
    if spec.base == "fp16":
        return _half_table().take(np.frombuffer(data, "<u2")).reshape(shape)
    n, c, r = _channels(shape)
    raw = np.frombuffer(data, _U8)
    scale = raw[: 4 * c].view(_F32).astype(np.float32, copy=False)
    if scale.size and not (scale.min() >= 0 and math.isfinite(scale.max())):   # NaN fails ">="
        raise CodecError("data", "a channel scale is negative, NaN or inf")
    zero_point = raw[4 * c: 5 * c]
    if spec.base == "int8":
        q3 = raw[5 * c:].reshape(n, c, r)
    elif spec.base == "int4":
        packed = raw[5 * c:]
        q = np.empty(2 * packed.size, _U8)
        np.right_shift(packed, 4, out=q[0::2])
        np.bitwise_and(packed, 15, out=q[1::2])
        q3 = q[: n * c * r].reshape(n, c, r)
    else:
        size_all = n * c * r
        head = 5 * c + (size_all + 7) // 8
        keep = np.unpackbits(raw[5 * c: head], count=size_all).view(bool)
        kept = int(np.count_nonzero(keep))
        if size - head != kept:
            raise CodecError("data", f"the bitmap marks {kept} entries but {size - head} codes follow")
        q3 = np.empty((n, c, r), _U8)
        q3[...] = zero_point[None, :, None]
        q3.reshape(-1)[np.flatnonzero(keep)] = raw[head:]   # faster than q[keep] = or np.place
    return _dequantise(q3, scale, zero_point).reshape(shape)
