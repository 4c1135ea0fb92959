"""Latent transport codec: a self-describing, checksummed, size-capped frame around a zstd payload.

What crosses the network between the edge server (shared phase) and a device (branch phase) is the
intermediate latent of a group. ``LatentCodec.encode`` turns a float tensor into one frame of bytes,
``LatentCodec.decode`` turns a frame back into a tensor and refuses anything malformed with a
``CodecError`` before allocating more than ``max_decoded_bytes``.

Frame layout (all integers little-endian; see docs/codec.md for the table)::

    fixed header (28 B) | shape (4 B x ndim) | quant params (8 B x channels) | zstd payload | blake2b-128

Modes
    lossless: ``fp32``, ``fp16``, ``bf16``  -- byte-shuffled, then zstd. Bit-exact for data already in
              that dtype; other float inputs are cast (fp16 refuses values outside +-65504, every
              lossless mode a value its cast would turn into Inf).
    lossy:    ``int8``, ``int6``, ``int5``, ``int4`` -- per-channel affine (min/max) uniform quantizer with
              2**bits levels (int4 packs two codes per byte), then zstd, which entropy-codes the codes.
              ``fp8`` -- per-channel absmax scaling to float8 e4m3, then zstd.
    Lossless modes decode to their own dtype; lossy modes decode to float32 (on CPU).
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import zstandard

from sage_core.names import CODEC_MODES, LOSSLESS_MODES, LOSSY_MODES

__all__ = [
    "CodecError",
    "CodecSpec",
    "DEFAULT_PREFERENCE",
    "FrameHeader",
    "LatentCodec",
    "LOSSLESS_MODES",
    "LOSSY_MODES",
    "MODES",
    "RECOMMENDED_LOSSY_MODE",
    "join_chunks",
    "negotiate",
    "parse_header",
    "split_chunks",
]

# ----------------------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------------------

MAGIC = b"SGLC"
VERSION = 1
BYTE_ORDER_LITTLE = ord("<")
MAX_NDIM = 8
NO_AXIS = 0xFF
FLAG_SHUFFLED = 0x0001
KNOWN_FLAGS = FLAG_SHUFFLED
DIGEST_SIZE = 16  # blake2b-128 over every byte of the frame before it
MIN_LEVEL, MAX_LEVEL = -7, zstandard.MAX_COMPRESSION_LEVEL
DEFAULT_MAX_DECODED_BYTES = 64 * 2**20
DEFAULT_CHUNK_SIZE = 256 * 1024
FP16_MAX = 65504.0
FP8_MAX = 448.0  # float8_e4m3fn
MAX_LOSSY_MAGNITUDE = 1e30  # keeps scale x code + offset far from float32 overflow

# magic, version, mode, payload dtype, byte order, ndim, quant axis, flags, raw length, compressed length
_FIXED = struct.Struct("<4sBBBBBBHQQ")
FIXED_HEADER_SIZE = _FIXED.size  # 28
_DIM = struct.Struct("<I")
_QPARAM = np.dtype("<f4")  # per channel: scale, offset

MODES: tuple[str, ...] = CODEC_MODES
RECOMMENDED_LOSSY_MODE = "int4"
# `negotiate`'s preference when its caller gives none: smallest first, lossless last (a device that accepts only
# lossless gets fp16). The edge server passes its own `codecs` setting instead, fp32 first by default.
DEFAULT_PREFERENCE: tuple[str, ...] = (RECOMMENDED_LOSSY_MODE, "int8", "fp16", "bf16", "fp32")

_MODE_CODE: dict[str, int] = {m: i for i, m in enumerate(MODES)}

# Payload element dtypes: the allowlist. code -> (name, bytes per element or 0 for packed nibbles)
_DT_F32, _DT_F16, _DT_BF16, _DT_U8, _DT_U4, _DT_F8 = 1, 2, 3, 4, 5, 6
_DTYPE_ALLOWLIST: dict[int, str] = {
    _DT_F32: "float32",
    _DT_F16: "float16",
    _DT_BF16: "bfloat16",
    _DT_U8: "uint8",
    _DT_U4: "uint4x2",
    _DT_F8: "float8_e4m3fn",
}
_ITEMSIZE: dict[int, int] = {_DT_F32: 4, _DT_F16: 2, _DT_BF16: 2, _DT_U8: 1, _DT_U4: 0, _DT_F8: 1}
_MODE_DTYPE: dict[str, int] = {
    "fp32": _DT_F32,
    "fp16": _DT_F16,
    "bf16": _DT_BF16,
    "int8": _DT_U8,
    "int6": _DT_U8,
    "int5": _DT_U8,
    "int4": _DT_U4,
    "fp8": _DT_F8,
}
_MODE_BITS: dict[str, int] = {"int8": 8, "int6": 6, "int5": 5, "int4": 4}
_TORCH_OUT: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_FLOAT_INPUTS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class CodecError(ValueError):
    """The only exception the codec raises for bad input, bad frames or bad settings."""


# ----------------------------------------------------------------------------------------------------------
# Spec, header
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodecSpec:
    """What to send: a mode from ``MODES`` and a zstd level in [-7, 22]."""

    mode: str = "fp16"
    level: int = 3

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise CodecError(f"unknown codec mode {self.mode!r}; known modes: {', '.join(MODES)}")
        if not isinstance(self.level, int) or isinstance(self.level, bool):
            raise CodecError(f"zstd level must be an int, got {type(self.level).__name__}")
        if not MIN_LEVEL <= self.level <= MAX_LEVEL:
            raise CodecError(f"zstd level {self.level} outside [{MIN_LEVEL}, {MAX_LEVEL}]")

    @property
    def lossless(self) -> bool:
        """True for the modes that are bit-exact for data of their own dtype."""
        return self.mode in LOSSLESS_MODES


@dataclass(frozen=True)
class FrameHeader:
    """Everything a frame declares about itself, validated against the limits but not yet checksummed."""

    version: int
    mode: str
    payload_dtype: str
    shape: tuple[int, ...]
    quant_axis: int | None
    shuffled: bool
    raw_length: int
    compressed_length: int
    header_length: int  # fixed header + shape + quant params

    @property
    def numel(self) -> int:
        """Number of latent elements."""
        return math.prod(self.shape)

    @property
    def channels(self) -> int:
        """Number of (scale, offset) pairs carried: 0 for lossless, else channels along the quant axis."""
        return _channels(self.mode, self.shape, self.quant_axis)

    @property
    def frame_length(self) -> int:
        """Exact length of the whole frame, digest included."""
        return self.header_length + self.compressed_length + DIGEST_SIZE

    @property
    def decoded_bytes(self) -> int:
        """Bytes of the tensor ``decode`` returns."""
        out = _TORCH_OUT.get(self.mode, torch.float32)
        return self.numel * torch.empty((), dtype=out).element_size()


def _byte_view(frame: bytes | bytearray | memoryview) -> memoryview:
    """A flat unsigned-byte view of a bytes-like frame."""
    try:
        return memoryview(frame).cast("B")
    except TypeError as exc:
        raise CodecError(f"frame must be a contiguous bytes-like object: {exc}") from None


def _channels(mode: str, shape: tuple[int, ...], axis: int | None) -> int:
    """Number of quantization channels of a frame."""
    if mode in LOSSLESS_MODES:
        return 0
    return 1 if axis is None else shape[axis]


def _raw_length(dtype_code: int, numel: int) -> int:
    """Bytes of the uncompressed payload for ``numel`` elements of a payload dtype."""
    if dtype_code == _DT_U4:
        return (numel + 1) // 2
    return numel * _ITEMSIZE[dtype_code]


def default_quant_axis(ndim: int) -> int | None:
    """Per-channel axis: 1 for [B, C, ...] (ndim >= 4), 0 for [C, H, W] or [C, N], none for ndim <= 1."""
    if ndim >= 4:
        return 1
    if ndim >= 2:
        return 0
    return None


def parse_header(
    frame: bytes | bytearray | memoryview, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
) -> FrameHeader:
    """Parse and bound-check a frame's header (works on a prefix: the first chunk of a stream is enough).

    Checks magic, version, mode, dtype allowlist, byte order, ndim, axis, flags, that shape x itemsize equals
    the declared payload length and that payload and decoded tensor fit ``max_decoded_bytes``. Nothing is
    allocated from declared sizes. Does not check the digest or the frame's total length.
    """
    buf = _byte_view(frame)
    if len(buf) < FIXED_HEADER_SIZE:
        raise CodecError(f"frame truncated: {len(buf)} bytes, the fixed header alone is {FIXED_HEADER_SIZE}")
    magic, version, mode_code, dt_code, order, ndim, axis_code, flags, raw_len, comp_len = _FIXED.unpack_from(buf)
    if magic != MAGIC:
        raise CodecError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise CodecError(f"unsupported frame version {version}, this codec reads version {VERSION}")
    if mode_code >= len(MODES):
        raise CodecError(f"unknown mode code {mode_code}; known codes 0..{len(MODES) - 1}")
    mode = MODES[mode_code]
    if dt_code not in _DTYPE_ALLOWLIST:
        raise CodecError(f"payload dtype code {dt_code} not in the allowlist {sorted(_DTYPE_ALLOWLIST)}")
    if dt_code != _MODE_DTYPE[mode]:
        raise CodecError(
            f"payload dtype {_DTYPE_ALLOWLIST[dt_code]} does not match mode {mode} "
            f"(expects {_DTYPE_ALLOWLIST[_MODE_DTYPE[mode]]})"
        )
    if order != BYTE_ORDER_LITTLE:
        raise CodecError(f"byte order {order:#x} unsupported; only little-endian ({BYTE_ORDER_LITTLE:#x})")
    if ndim > MAX_NDIM:
        raise CodecError(f"ndim {ndim} exceeds the limit of {MAX_NDIM}")
    if flags & ~KNOWN_FLAGS:
        raise CodecError(f"unknown flag bits {flags & ~KNOWN_FLAGS:#x}")
    shuffled = bool(flags & FLAG_SHUFFLED)
    if shuffled and _ITEMSIZE[dt_code] <= 1:
        raise CodecError(f"shuffle flag set for a {_ITEMSIZE[dt_code] or 0.5}-byte payload dtype")
    need = FIXED_HEADER_SIZE + _DIM.size * ndim
    if len(buf) < need:
        raise CodecError(f"frame truncated: {len(buf)} bytes, header with {ndim} dims needs {need}")
    shape = tuple(_DIM.unpack_from(buf, FIXED_HEADER_SIZE + _DIM.size * i)[0] for i in range(ndim))
    if axis_code == NO_AXIS:
        axis: int | None = None
    elif mode in LOSSLESS_MODES or axis_code >= ndim:
        raise CodecError(f"quant axis {axis_code} invalid for mode {mode} with ndim {ndim}")
    else:
        axis = axis_code
    numel = math.prod(shape)
    span = math.prod(max(d, 1) for d in shape)
    if span > max_decoded_bytes:
        raise CodecError(
            f"shape {list(shape)} spans {span} elements (empty dims aside), above the cap of {max_decoded_bytes}"
        )
    expected_raw = _raw_length(dt_code, numel)
    if raw_len != expected_raw:
        raise CodecError(
            f"declared payload length {raw_len} != shape {list(shape)} x itemsize "
            f"({_DTYPE_ALLOWLIST[dt_code]}) = {expected_raw}"
        )
    header = FrameHeader(
        version=version,
        mode=mode,
        payload_dtype=_DTYPE_ALLOWLIST[dt_code],
        shape=shape,
        quant_axis=axis,
        shuffled=shuffled,
        raw_length=raw_len,
        compressed_length=comp_len,
        header_length=need + _QPARAM.itemsize * 2 * _channels(mode, shape, axis),
    )
    largest = max(raw_len, header.decoded_bytes)
    if largest > max_decoded_bytes:
        raise CodecError(f"frame declares {largest} decoded bytes, above the cap of {max_decoded_bytes}")
    return header


# ----------------------------------------------------------------------------------------------------------
# Byte shuffle, quantizers
# ----------------------------------------------------------------------------------------------------------


def shuffle_bytes(raw: np.ndarray, itemsize: int) -> bytes:
    """Byte-transpose a flat array: all first bytes, then all second bytes, ... (improves zstd on floats)."""
    if itemsize <= 1:
        return raw.tobytes()
    return raw.view(np.uint8).reshape(-1, itemsize).T.tobytes()


def unshuffle_bytes(data: bytes, itemsize: int) -> np.ndarray:
    """Inverse of ``shuffle_bytes``: a flat uint8 array in element order."""
    arr = np.frombuffer(data, dtype=np.uint8)
    if itemsize <= 1:
        return arr
    return np.ascontiguousarray(arr.reshape(itemsize, -1).T).reshape(-1)


def _channels_first(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """View the tensor as [channels, rest] in float32 (channels = 1 when per-tensor)."""
    x = x.to(torch.float32)
    channels = 1 if axis is None else x.shape[axis]
    rest = x.numel() // channels if channels else 0
    if axis is None:
        return x.reshape(1, rest)
    return x.movedim(axis, 0).reshape(channels, rest)


def _from_channels_first(y: torch.Tensor, shape: tuple[int, ...], axis: int | None) -> torch.Tensor:
    """Inverse of ``_channels_first``."""
    if axis is None:
        return y.reshape(shape)
    moved = (shape[axis],) + shape[:axis] + shape[axis + 1 :]
    return y.reshape(moved).movedim(0, axis).contiguous()


def _affine_params(y: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, offset) of a min/max uniform quantizer with ``levels`` levels."""
    if y.shape[1] == 0:
        zeros = torch.zeros(y.shape[0], dtype=torch.float32)
        return zeros, zeros.clone()
    lo = y.amin(dim=1)
    hi = y.amax(dim=1)
    scale = ((hi.double() - lo.double()) / (levels - 1)).float()
    if not bool(torch.isfinite(scale).all()):
        raise CodecError("channel range overflows float32; cannot quantize")
    return scale, lo


def _quantize_affine(y: torch.Tensor, bits: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Quantize [C, N] float32 to uint8 codes in [0, 2**bits - 1] with per-channel min/max."""
    levels = 2**bits
    scale, offset = _affine_params(y, levels)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((y - offset[:, None]) / safe[:, None]).clamp_(0, levels - 1)
    return q.to(torch.uint8).reshape(-1).numpy(), scale, offset


def _quantize_fp8(y: torch.Tensor) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Scale each channel so its absmax maps to the float8 e4m3 max, then cast."""
    if y.shape[1] == 0:
        zeros = torch.zeros(y.shape[0], dtype=torch.float32)
        return np.zeros(0, np.uint8), zeros, zeros.clone()
    scale = y.abs().amax(dim=1) / FP8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (y / safe[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(torch.uint8).reshape(-1).numpy(), scale, torch.zeros_like(scale)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Pack 4-bit codes two per byte, low nibble first (odd length: last high nibble is 0)."""
    if codes.size % 2:
        codes = np.concatenate([codes, np.zeros(1, np.uint8)])
    return (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, numel: int) -> np.ndarray:
    """Inverse of ``pack_nibbles``."""
    out = np.empty(packed.size * 2, dtype=np.uint8)
    out[0::2] = packed & 0x0F
    out[1::2] = packed >> 4
    return out[:numel]


# ----------------------------------------------------------------------------------------------------------
# Codec
# ----------------------------------------------------------------------------------------------------------


class LatentCodec:
    """Encode latents to frames and decode frames back, refusing anything unsafe with ``CodecError``.
    Stateless after construction: one instance may be shared by threads."""

    def __init__(self, spec: CodecSpec = CodecSpec(), max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES):
        if not isinstance(spec, CodecSpec):
            raise CodecError(f"spec must be a CodecSpec, got {type(spec).__name__}")
        if not isinstance(max_decoded_bytes, int) or max_decoded_bytes <= 0:
            raise CodecError(f"max_decoded_bytes must be a positive int, got {max_decoded_bytes!r}")
        self.spec = spec
        self.max_decoded_bytes = max_decoded_bytes

    # -- encode ------------------------------------------------------------------------------------------

    def encode(self, latent: torch.Tensor) -> bytes:
        """Encode a float tensor of any shape (ndim <= 8) into one frame."""
        x = self._check_input(latent)
        mode = self.spec.mode
        dt_code = _MODE_DTYPE[mode]
        axis = None if mode in LOSSLESS_MODES else default_quant_axis(x.ndim)
        qparams = np.zeros((0, 2), dtype=_QPARAM)
        if mode in LOSSLESS_MODES:
            raw, itemsize = self._lossless_payload(x, mode)
        else:
            y = _channels_first(x, axis)
            if mode == "fp8":
                codes, scale, offset = _quantize_fp8(y)
            else:
                codes, scale, offset = _quantize_affine(y, _MODE_BITS[mode])
                if mode == "int4":
                    codes = pack_nibbles(codes)
            raw, itemsize = codes, 1
            qparams = torch.stack([scale, offset], dim=1).numpy().astype(_QPARAM)
        shuffled = itemsize > 1
        payload_raw = shuffle_bytes(raw, itemsize)
        # a fresh zstd context per call (~40 us): zstd contexts are not thread-safe, a LatentCodec is
        cctx = zstandard.ZstdCompressor(level=self.spec.level, write_checksum=True, write_content_size=True)
        compressed = cctx.compress(payload_raw)
        head = _FIXED.pack(
            MAGIC,
            VERSION,
            _MODE_CODE[mode],
            dt_code,
            BYTE_ORDER_LITTLE,
            x.ndim,
            NO_AXIS if axis is None else axis,
            FLAG_SHUFFLED if shuffled else 0,
            len(payload_raw),
            len(compressed),
        )
        dims = b"".join(_DIM.pack(d) for d in x.shape)
        body = b"".join([head, dims, qparams.tobytes(), compressed])
        return body + hashlib.blake2b(body, digest_size=DIGEST_SIZE).digest()

    def _check_input(self, latent: torch.Tensor) -> torch.Tensor:
        """Validate a tensor for encoding and return it detached, contiguous, on CPU."""
        if not isinstance(latent, torch.Tensor):
            raise CodecError(f"latent must be a torch.Tensor, got {type(latent).__name__}")
        if latent.dtype not in _FLOAT_INPUTS:
            raise CodecError(f"latent dtype {latent.dtype} not supported; use one of {_FLOAT_INPUTS}")
        if latent.ndim > MAX_NDIM:
            raise CodecError(f"latent has {latent.ndim} dims, the limit is {MAX_NDIM}")
        if math.prod(max(d, 1) for d in latent.shape) > self.max_decoded_bytes:
            raise CodecError(f"latent shape {tuple(latent.shape)} too large for the cap of {self.max_decoded_bytes}")
        x = latent.detach().to("cpu").contiguous()
        if not bool(torch.isfinite(x).all()):
            raise CodecError("latent contains NaN or Inf; refusing to encode")
        if self.spec.mode in LOSSY_MODES and x.numel() and float(x.abs().max()) > MAX_LOSSY_MAGNITUDE:
            raise CodecError(f"latent magnitude above {MAX_LOSSY_MAGNITUDE:g} cannot be quantized safely")
        out_size = _TORCH_OUT.get(self.spec.mode, torch.float32)
        size = x.numel() * torch.empty((), dtype=out_size).element_size()
        if size > self.max_decoded_bytes:
            raise CodecError(f"latent decodes to {size} bytes, above the cap of {self.max_decoded_bytes}")
        return x

    @staticmethod
    def _lossless_payload(x: torch.Tensor, mode: str) -> tuple[np.ndarray, int]:
        """Cast to the mode's dtype (refusing fp16 overflow, and any value the cast turns into Inf) and return its
        bytes as a flat array."""
        target = _TORCH_OUT[mode]
        if target == torch.float16 and x.numel() and float(x.abs().max()) > FP16_MAX:
            raise CodecError(f"latent magnitude {float(x.abs().max()):.4g} overflows fp16 (max {FP16_MAX})")
        y = x.to(target).reshape(-1)
        if not bool(torch.isfinite(y).all()):
            raise CodecError(f"latent magnitude {float(x.abs().max()):.4g} overflows {mode}")
        if target == torch.bfloat16:
            y = y.view(torch.int16)
        arr = y.numpy()
        return arr.astype(arr.dtype.newbyteorder("<"), copy=False), arr.dtype.itemsize

    # -- decode ------------------------------------------------------------------------------------------

    def decode(self, frame: bytes) -> torch.Tensor:
        """Decode one frame. Lossless modes return their own dtype, lossy modes float32; all on CPU."""
        if not isinstance(frame, bytes | bytearray | memoryview):
            raise CodecError(f"frame must be bytes, got {type(frame).__name__}")
        buf = _byte_view(frame)
        header = parse_header(buf, self.max_decoded_bytes)
        if len(buf) > header.frame_length:
            raise CodecError(
                f"{len(buf) - header.frame_length} trailing bytes after a {header.frame_length}-byte frame"
            )
        if len(buf) < header.frame_length:
            raise CodecError(f"frame truncated: {len(buf)} bytes, header declares {header.frame_length}")
        body = buf[:-DIGEST_SIZE]
        if hashlib.blake2b(body, digest_size=DIGEST_SIZE).digest() != bytes(buf[-DIGEST_SIZE:]):
            raise CodecError("frame checksum (blake2b-128) mismatch: corrupted or tampered frame")
        q_start = header.header_length - _QPARAM.itemsize * 2 * header.channels
        qparams = np.frombuffer(body[q_start : header.header_length], dtype=_QPARAM).reshape(-1, 2)
        raw = self._decompress(body[header.header_length :], header.raw_length)
        return self._rebuild(header, raw, qparams)

    def _decompress(self, payload: memoryview, raw_length: int) -> bytes:
        """Decompress exactly one zstd frame whose content size is declared, checksummed and == raw_length."""
        try:
            params = zstandard.get_frame_parameters(payload)
        except zstandard.ZstdError as exc:
            raise CodecError(f"payload is not a zstd frame: {exc}") from None
        if params.content_size != raw_length:
            raise CodecError(
                f"zstd frame content size {params.content_size} != declared payload length {raw_length} "
                f"(cap {self.max_decoded_bytes})"
            )
        if not params.has_checksum:
            raise CodecError("zstd frame has no content checksum")
        window = max(1 << 10, 1 << max(raw_length - 1, 1).bit_length())
        if params.window_size > window:
            raise CodecError(f"zstd window {params.window_size} larger than the payload needs ({window})")
        try:
            dctx = zstandard.ZstdDecompressor(max_window_size=window)
            out = dctx.decompress(payload, max_output_size=raw_length, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd payload invalid: {exc}") from None
        if len(out) != raw_length:
            raise CodecError(f"payload decompressed to {len(out)} bytes, declared {raw_length}")
        return out

    @staticmethod
    def _rebuild(header: FrameHeader, raw: bytes, qparams: np.ndarray) -> torch.Tensor:
        """Turn a verified raw payload back into a finite tensor."""
        mode, shape = header.mode, header.shape
        if mode in LOSSLESS_MODES:
            itemsize = _ITEMSIZE[_MODE_DTYPE[mode]]
            flat = unshuffle_bytes(raw, itemsize) if header.shuffled else np.frombuffer(raw, np.uint8)
            np_dtype = {"fp32": "<f4", "fp16": "<f2", "bf16": "<i2"}[mode]
            arr = flat.view(np_dtype).astype(np.dtype(np_dtype).newbyteorder("="), copy=True)
            out = torch.from_numpy(arr)
            if mode == "bf16":
                out = out.view(torch.bfloat16)
            out = out.reshape(shape)
        else:
            if not np.isfinite(qparams).all():
                raise CodecError("quantization parameters contain NaN or Inf")
            if (qparams[:, 0] < 0).any():
                raise CodecError("quantization scale is negative")
            codes = np.frombuffer(raw, dtype=np.uint8)
            axis = header.quant_axis
            channels = header.channels
            scale = torch.from_numpy(qparams[:, 0].astype(np.float32))[:, None]
            offset = torch.from_numpy(qparams[:, 1].astype(np.float32))[:, None]
            if mode == "fp8":
                vals = torch.from_numpy(codes.copy()).view(torch.float8_e4m3fn).to(torch.float32)
            else:
                if mode == "int4":
                    codes = unpack_nibbles(codes, header.numel)
                elif (codes >> _MODE_BITS[mode]).any():
                    raise CodecError(f"{mode} payload has codes >= 2**{_MODE_BITS[mode]}")
                vals = torch.from_numpy(codes.astype(np.float32))
            y = vals.reshape(channels, header.numel // channels if channels else 0) * scale + offset
            out = _from_channels_first(y, shape, axis)
        if not bool(torch.isfinite(out).all()):
            raise CodecError("decoded latent contains NaN or Inf; refusing it")
        return out


# ----------------------------------------------------------------------------------------------------------
# Stream chunks, negotiation
# ----------------------------------------------------------------------------------------------------------


def split_chunks(frame: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[bytes]:
    """Split a frame into chunks of at most ``chunk_size`` bytes (at least one chunk, even if empty)."""
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise CodecError(f"chunk_size must be a positive int, got {chunk_size!r}")
    data = bytes(frame)
    return [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)] or [b""]


def join_chunks(chunks: Iterable[bytes], max_frame_bytes: int = DEFAULT_MAX_DECODED_BYTES + 2**20) -> bytes:
    """Concatenate received chunks, refusing to buffer more than ``max_frame_bytes``."""
    parts: list[bytes] = []
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > max_frame_bytes:
            raise CodecError(f"stream exceeds {max_frame_bytes} bytes; refusing to buffer more")
        parts.append(bytes(chunk))
    return b"".join(parts)


def negotiate(accepted: Sequence[str], preferred: Sequence[str] = DEFAULT_PREFERENCE) -> str:
    """Return the first mode of the server's ``preferred`` list that the device ``accepted``.

    An empty ``accepted`` means "any lossless mode" (wire protocol v1, ImageRequest.accepted_codecs). Unknown
    names in ``accepted`` (a newer device) are ignored; unknown names in ``preferred`` are a server configuration
    error. Raises ``CodecError`` when nothing matches.
    """
    unknown = [m for m in preferred if m not in MODES]
    if unknown:
        raise CodecError(f"server prefers unknown modes {unknown}; known modes: {', '.join(MODES)}")
    accepted_set = {m for m in accepted if isinstance(m, str)} if len(accepted) else set(LOSSLESS_MODES)
    for mode in preferred:
        if mode in accepted_set:
            return mode
    raise CodecError(
        f"no common codec mode: device accepts {sorted(accepted_set)[:16]}, server offers {list(preferred)}"
    )
