"""Tests of the latent transport codec: round trips, frame layout, safety rules, fuzzing, chunks, negotiation."""

from __future__ import annotations

import hashlib
import math
import os
import struct
import tracemalloc

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sage_core.codec import (
    DEFAULT_PREFERENCE,
    DIGEST_SIZE,
    FIXED_HEADER_SIZE,
    LOSSLESS_MODES,
    LOSSY_MODES,
    MODES,
    RECOMMENDED_LOSSY_MODE,
    CodecError,
    CodecSpec,
    LatentCodec,
    join_chunks,
    negotiate,
    parse_header,
    split_chunks,
)

# Independent re-statement of the documented layout (docs/codec.md), used to build hostile frames.
FIXED = struct.Struct("<4sBBBBBBHQQ")
DTYPE_CODE = {"fp32": 1, "fp16": 2, "bf16": 3, "int8": 4, "int6": 4, "int5": 4, "int4": 5, "fp8": 6}


def seal(body: bytes) -> bytes:
    """Append the frame digest (blake2b-128 of everything before it)."""
    return body + hashlib.blake2b(body, digest_size=16).digest()


def make_frame(
    mode: str,
    shape: tuple[int, ...],
    raw: bytes,
    *,
    qparams: np.ndarray | None = None,
    axis: int | None = None,
    shuffled: bool = False,
    raw_len: int | None = None,
    zstd_payload: bytes | None = None,
    dtype_code: int | None = None,
    version: int = 1,
    order: int = ord("<"),
    flags: int | None = None,
    magic: bytes = b"SGLC",
) -> bytes:
    """Build a sealed frame by hand from the documented layout, with any field overridable."""
    payload = zstd_payload if zstd_payload is not None else zstandard.ZstdCompressor(write_checksum=True).compress(raw)
    head = FIXED.pack(
        magic,
        version,
        MODES.index(mode),
        DTYPE_CODE[mode] if dtype_code is None else dtype_code,
        order,
        len(shape),
        0xFF if axis is None else axis,
        (1 if shuffled else 0) if flags is None else flags,
        len(raw) if raw_len is None else raw_len,
        len(payload),
    )
    dims = b"".join(struct.pack("<I", d) for d in shape)
    q = b"" if qparams is None else np.asarray(qparams, dtype="<f4").tobytes()
    return seal(head + dims + q + payload)


def latent(shape=(1, 4, 16, 16), seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern of a float tensor (so -0.0 != 0.0 and NaN payloads count)."""
    view = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[x.dtype]
    return x.contiguous().view(view)


# ------------------------------------------------------------------------------------------------------
# API constants and spec
# ------------------------------------------------------------------------------------------------------


def test_modes_and_constants():
    assert issubclass(CodecError, ValueError)
    assert set(LOSSLESS_MODES) | set(LOSSY_MODES) == set(MODES)
    assert {"fp32", "fp16", "bf16", "int8", "int4", "fp8"} <= set(MODES)
    assert RECOMMENDED_LOSSY_MODE in LOSSY_MODES
    assert CodecSpec() == CodecSpec("fp16", 3)


@pytest.mark.parametrize("kwargs", [{"mode": "png"}, {"level": 23}, {"level": -8}, {"level": 1.5}])
def test_spec_refuses_bad_settings(kwargs):
    with pytest.raises(CodecError):
        CodecSpec(**kwargs)


def test_codec_refuses_bad_cap():
    with pytest.raises(CodecError):
        LatentCodec(max_decoded_bytes=0)


# ------------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------------


SPECIALS = [0.0, -0.0, 1e-45, -1e-40, 3.0e38, -3.0e38, 1.0, -2.5, 6.1e-5, 5.96e-8]


@pytest.mark.parametrize("mode,dtype", [("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)])
@pytest.mark.parametrize("shape", [(1, 4, 64, 64), (4, 8, 8), (7,), (), (2, 0, 3), (1, 1, 1, 1, 1, 1, 1, 3)])
def test_lossless_round_trip_is_bit_exact(mode, dtype, shape):
    x = latent(shape).to(dtype)
    if x.numel() >= len(SPECIALS) and mode != "fp16":
        x.view(-1)[: len(SPECIALS)] = torch.tensor(SPECIALS).to(dtype)
    y = LatentCodec(CodecSpec(mode)).decode(LatentCodec(CodecSpec(mode)).encode(x))
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(bits(y), bits(x))


def test_fp16_specials_are_bit_exact():
    x = torch.tensor([0.0, -0.0, 6.1e-5, -5.96e-8, 65504.0, -65504.0, 1.0009765625], dtype=torch.float16)
    y = LatentCodec(CodecSpec("fp16")).decode(LatentCodec(CodecSpec("fp16")).encode(x))
    assert torch.equal(bits(y), bits(x))


def test_float32_sent_as_fp16_is_cast_with_bounded_error():
    x = latent((1, 4, 32, 32)) * 3
    y = LatentCodec(CodecSpec("fp16")).decode(LatentCodec(CodecSpec("fp16")).encode(x))
    assert y.dtype == torch.float16
    rel = ((y.float() - x).abs() / x.abs().clamp_min(2**-14)).max().item()
    assert rel <= 2**-11


def test_fp16_refuses_overflow_instead_of_sending_inf():
    with pytest.raises(CodecError, match="overflows fp16"):
        LatentCodec(CodecSpec("fp16")).encode(torch.tensor([1.0, 70000.0]))


@pytest.mark.parametrize("mode,x", [("fp32", torch.tensor([1.0, 1e300], dtype=torch.float64)),
                                    ("bf16", torch.tensor([1.0, 3.4e38]))])
def test_lossless_modes_refuse_a_cast_overflow_instead_of_sending_a_frame_decode_refuses(mode, x):
    with pytest.raises(CodecError, match=f"overflows {mode}"):
        LatentCodec(CodecSpec(mode)).encode(x)


def test_fp32_mode_casts_float64_and_is_exact_for_float32_values():
    x = latent((3, 5)).double()
    y = LatentCodec(CodecSpec("fp32")).decode(LatentCodec(CodecSpec("fp32")).encode(x))
    assert y.dtype == torch.float32 and torch.equal(y, x.float())


@pytest.mark.parametrize("mode,bits_", [("int8", 8), ("int6", 6), ("int5", 5), ("int4", 4)])
@pytest.mark.parametrize("shape,axis", [((2, 4, 9, 7), 1), ((4, 9, 7), 0), ((5, 3), 0), ((11,), None)])
def test_affine_modes_error_within_half_step_per_channel(mode, bits_, shape, axis):
    x = latent(shape)
    if axis is not None:  # give the channels very different ranges
        ramp = torch.logspace(-2, 2, shape[axis]).reshape([-1 if i == axis else 1 for i in range(len(shape))])
        x = x * ramp
    y = LatentCodec(CodecSpec(mode)).decode(LatentCodec(CodecSpec(mode)).encode(x))
    assert y.dtype == torch.float32 and y.shape == x.shape
    xs = x.movedim(axis, 0).reshape(shape[axis], -1) if axis is not None else x.reshape(1, -1)
    ys = y.movedim(axis, 0).reshape(shape[axis], -1) if axis is not None else y.reshape(1, -1)
    step = (xs.amax(1) - xs.amin(1)) / (2**bits_ - 1)
    err = (xs - ys).abs().amax(1)
    assert torch.all(err <= step * 0.5001 + 1e-6), (err, step)


def test_fp8_relative_error():
    x = latent((1, 4, 16, 16)) * torch.tensor([0.01, 1, 10, 1000]).reshape(1, 4, 1, 1)
    y = LatentCodec(CodecSpec("fp8")).decode(LatentCodec(CodecSpec("fp8")).encode(x))
    absmax = x.abs().amax(dim=(0, 2, 3), keepdim=True)
    # e4m3: 3 mantissa bits -> relative error <= 2^-4 for normals, absolute floor from the subnormal step
    bound = x.abs() * 2**-4 + absmax / 448 * 2**-9 + 1e-12
    assert torch.all((y - x).abs() <= bound)


def test_fp8_maps_each_channels_absmax_to_the_e4m3_max():
    """A channel whose absmax is 448 goes at scale 1 (one at 112, at scale 1/4): every value e4m3 holds exactly,
    subnormals included, comes back exactly."""
    vals = torch.tensor([448.0, -448.0, 1.0, -0.5, 2**-9, 3 * 2**-9, 2**-6, 0.0]).reshape(1, 1, 2, 4)
    x = torch.cat([vals, vals / 4], dim=1)
    assert torch.equal(LatentCodec(CodecSpec("fp8")).decode(LatentCodec(CodecSpec("fp8")).encode(x)), x)


@pytest.mark.parametrize("mode", LOSSY_MODES)
def test_constant_and_empty_channels(mode):
    x = torch.zeros(1, 3, 5, 5)
    x[:, 1] = 2.5
    x[:, 2] = -1e-3
    y = LatentCodec(CodecSpec(mode)).decode(LatentCodec(CodecSpec(mode)).encode(x))
    assert torch.allclose(y, x, atol=1e-6) if mode == "fp8" else torch.equal(y, x)
    empty = torch.zeros(2, 0, 3)
    assert LatentCodec(CodecSpec(mode)).decode(LatentCodec(CodecSpec(mode)).encode(empty)).shape == (2, 0, 3)


def test_int4_packs_two_values_per_byte_and_handles_odd_counts():
    x = latent((13,))
    frame = LatentCodec(CodecSpec("int4")).encode(x)
    assert parse_header(frame).raw_length == 7
    y = LatentCodec(CodecSpec("int4")).decode(frame)
    step = (x.max() - x.min()) / 15
    assert (y - x).abs().max() <= step / 2 + 1e-6


def test_lossy_modes_shrink_an_sd_size_latent_and_recommended_fits_8_kib():
    x = latent((1, 4, 64, 64))
    sizes = {m: len(LatentCodec(CodecSpec(m)).encode(x)) for m in MODES}
    assert sizes["fp16"] > 28 * 1024  # Gaussian data barely compresses losslessly
    assert sizes["int8"] < sizes["fp16"] and sizes["int4"] < sizes["int5"] < sizes["int6"] < sizes["int8"]
    assert sizes[RECOMMENDED_LOSSY_MODE] <= 8 * 1024


def test_shuffle_helps_fp32_on_smooth_data():
    x = torch.linspace(0, 1, 4096).reshape(1, 1, 64, 64).expand(1, 4, 64, 64).contiguous()
    plain = len(zstandard.ZstdCompressor(level=3).compress(x.numpy().tobytes()))
    assert len(LatentCodec(CodecSpec("fp32")).encode(x)) < plain


def test_level_is_configurable_and_used():
    x = torch.linspace(0, 1, 4096).reshape(4, 32, 32)
    fast = LatentCodec(CodecSpec("fp32", level=-7)).encode(x)
    strong = LatentCodec(CodecSpec("fp32", level=19)).encode(x)
    assert len(strong) < len(fast)
    for f in (fast, strong):
        assert torch.equal(LatentCodec(CodecSpec("fp32")).decode(f), x)


def test_encode_accepts_non_contiguous_and_autograd_tensors():
    x = latent((1, 4, 8, 8)).transpose(2, 3).requires_grad_(True)
    y = LatentCodec(CodecSpec("fp32")).decode(LatentCodec(CodecSpec("fp32")).encode(x))
    assert torch.equal(y, x.detach())


def test_one_codec_is_safe_to_share_between_threads():
    from concurrent.futures import ThreadPoolExecutor

    codec = LatentCodec(CodecSpec("int8", level=9))
    inputs = [latent((1, 4, 32, 32), seed=i) for i in range(32)]
    expected = [codec.encode(x) for x in inputs]
    with ThreadPoolExecutor(4) as pool:
        frames = list(pool.map(codec.encode, inputs * 4))
        decoded = list(pool.map(codec.decode, frames))
    assert frames == expected * 4
    assert all(torch.equal(a, b) for a, b in zip(decoded, [codec.decode(f) for f in expected] * 4, strict=True))


# ------------------------------------------------------------------------------------------------------
# Frame layout
# ------------------------------------------------------------------------------------------------------


def test_frame_layout_matches_the_documented_table():
    x = latent((1, 4, 8, 8))
    frame = LatentCodec(CodecSpec("int8", level=5)).encode(x)
    magic, version, mode, dt, order, ndim, axis, flags, raw_len, comp_len = FIXED.unpack_from(frame)
    assert FIXED_HEADER_SIZE == FIXED.size == 28 and DIGEST_SIZE == 16
    assert (magic, version, MODES[mode], dt, chr(order), ndim, axis, flags) == (b"SGLC", 1, "int8", 4, "<", 4, 1, 0)
    assert raw_len == 256
    shape = struct.unpack_from("<4I", frame, 28)
    assert shape == (1, 4, 8, 8)
    q = np.frombuffer(frame, dtype="<f4", count=8, offset=44).reshape(4, 2)
    assert np.allclose(q[:, 1], x.amin(dim=(0, 2, 3)).numpy())  # offsets = per-channel minimum
    assert len(frame) == 44 + 32 + comp_len + 16
    assert hashlib.blake2b(frame[:-16], digest_size=16).digest() == frame[-16:]
    params = zstandard.get_frame_parameters(frame[76:-16])
    assert params.content_size == raw_len and params.has_checksum
    header = parse_header(frame)
    assert header.frame_length == len(frame) and header.mode == "int8" and header.quant_axis == 1


def test_shuffled_flag_set_for_multibyte_lossless_payloads():
    for mode in LOSSLESS_MODES:
        assert parse_header(LatentCodec(CodecSpec(mode)).encode(latent((4,)))).shuffled
    assert not parse_header(LatentCodec(CodecSpec("int8")).encode(latent((4,)))).shuffled


def test_hand_built_frame_decodes():
    x = latent((2, 3))
    frame = make_frame("fp32", (2, 3), x.numpy().tobytes())
    assert torch.equal(LatentCodec(CodecSpec()).decode(frame), x)


# ------------------------------------------------------------------------------------------------------
# Safety rules (each must be refused with CodecError, for the stated reason)
# ------------------------------------------------------------------------------------------------------


def test_declared_size_above_cap_is_refused_before_allocation():
    frame = make_frame("fp32", (4,), b"", raw_len=2**64 - 1)
    with pytest.raises(CodecError, match="payload length"):
        LatentCodec().decode(frame)
    # consistent but huge declaration: 2^40 float32 values
    huge = make_frame("fp32", (2**20, 2**20), b"", raw_len=4 * 2**40)
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match="cap"):
            LatentCodec().decode(huge)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20


def test_legit_frame_above_the_receivers_cap_is_refused():
    frame = LatentCodec(CodecSpec("fp32")).encode(latent((1, 4, 16, 16)))  # 4 KiB decoded
    with pytest.raises(CodecError, match="cap of 4095"):
        LatentCodec(max_decoded_bytes=4095).decode(frame)
    assert LatentCodec(max_decoded_bytes=4096).decode(frame).numel() == 1024


def test_lossy_frame_decoding_above_the_receivers_cap_is_refused():
    """int4: 512 payload bytes decode to 4 KiB of float32; the cap bounds the decoded tensor, not the payload."""
    frame = LatentCodec(CodecSpec("int4")).encode(latent((1, 4, 16, 16)))
    assert parse_header(frame).raw_length == 512
    with pytest.raises(CodecError, match="cap of 4095"):
        LatentCodec(max_decoded_bytes=4095).decode(frame)
    assert LatentCodec(max_decoded_bytes=4096).decode(frame).numel() == 1024


def test_empty_tensor_with_huge_dims_is_refused():
    frame = make_frame("fp32", (0, 2**32 - 1, 2**32 - 1), b"")
    with pytest.raises(CodecError, match="spans"):
        LatentCodec().decode(frame)
    assert LatentCodec().decode(make_frame("fp32", (0, 5, 7), b"")).shape == (0, 5, 7)


def test_encode_refuses_latents_above_cap():
    with pytest.raises(CodecError, match="cap"):
        LatentCodec(CodecSpec("int8"), max_decoded_bytes=1000).encode(torch.zeros(1000))


def test_decompression_bomb_is_refused_by_zstd_content_size():
    bomb = zstandard.ZstdCompressor(level=19, write_checksum=True).compress(bytes(64 * 2**20))
    assert len(bomb) < 64 * 1024
    frame = make_frame("fp32", (4,), bytes(16), zstd_payload=bomb)
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match="content size"):
            LatentCodec().decode(frame)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20


def test_zstd_frame_without_content_size_is_refused():
    stream = zstandard.ZstdCompressor(write_checksum=True, write_content_size=False)
    obj = stream.compressobj()
    payload = obj.compress(bytes(16)) + obj.flush()
    assert zstandard.get_frame_parameters(payload).content_size != 16
    with pytest.raises(CodecError, match="content size"):
        LatentCodec().decode(make_frame("fp32", (4,), bytes(16), zstd_payload=payload))


def test_zstd_frame_without_checksum_is_refused():
    payload = zstandard.ZstdCompressor(write_checksum=False).compress(bytes(16))
    with pytest.raises(CodecError, match="checksum"):
        LatentCodec().decode(make_frame("fp32", (4,), bytes(16), zstd_payload=payload))


def test_zstd_frame_declaring_a_larger_window_than_its_payload_is_refused():
    """The same compressed blocks behind a zstd header that declares a 1 MiB window (not single-segment) for 16
    bytes: zstd's one-shot decompression would accept it; the codec refuses it."""
    single = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(bytes(16))
    fhd = single[4]
    assert fhd >> 5 & 1 and fhd >> 6 == 0  # single segment, 1-byte content size
    header = bytes([2 << 6 | fhd & 0x04, (20 - 10) << 3]) + struct.pack("<I", 16)  # 4-byte size, window 2**20
    wide = single[:4] + header + single[6:]
    assert zstandard.get_frame_parameters(wide).window_size == 2**20
    assert zstandard.ZstdDecompressor().decompress(wide) == bytes(16)
    with pytest.raises(CodecError, match="window"):
        LatentCodec().decode(make_frame("fp32", (4,), bytes(16), zstd_payload=wide))


def test_trailing_bytes_after_the_frame_are_refused():
    frame = LatentCodec(CodecSpec("fp16")).encode(latent((4, 4)))
    with pytest.raises(CodecError, match="trailing"):
        LatentCodec().decode(frame + b"\x00")
    with pytest.raises(CodecError, match="trailing"):
        LatentCodec().decode(frame + frame)


def test_trailing_bytes_inside_the_payload_are_refused():
    raw = bytes(16)
    payload = zstandard.ZstdCompressor(write_checksum=True).compress(raw)
    with pytest.raises(CodecError, match="zstd payload invalid"):
        LatentCodec().decode(make_frame("fp32", (4,), raw, zstd_payload=payload + b"junk"))
    with pytest.raises(CodecError, match="zstd payload invalid"):
        LatentCodec().decode(make_frame("fp32", (4,), raw, zstd_payload=payload + payload))


def test_shape_times_itemsize_must_equal_payload_length():
    raw = latent((6,)).numpy().tobytes()
    with pytest.raises(CodecError, match="payload length"):
        LatentCodec().decode(make_frame("fp32", (7,), raw))  # declares 28 bytes, carries 24
    with pytest.raises(CodecError, match="payload length"):
        LatentCodec().decode(make_frame("fp32", (7,), raw, raw_len=28))  # zstd content is 24
    with pytest.raises(CodecError, match="payload length"):
        LatentCodec().decode(make_frame("int4", (6,), bytes(6)))  # int4 needs 3 bytes for 6 values


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("mode", LOSSLESS_MODES)
def test_nan_or_inf_in_a_decoded_latent_is_refused(mode, value):
    x = torch.tensor([1.0, value, 2.0])
    np_view = {"fp32": "<f4", "fp16": "<f2", "bf16": None}[mode]
    raw = (
        x.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
        if np_view is None
        else x.numpy().astype(np_view).tobytes()
    )
    itemsize = 4 if mode == "fp32" else 2
    shuffled = np.frombuffer(raw, np.uint8).reshape(-1, itemsize).T.tobytes()
    with pytest.raises(CodecError, match="NaN or Inf"):
        LatentCodec().decode(make_frame(mode, (3,), shuffled, shuffled=True))


def test_nan_in_fp8_payload_and_in_quant_params_is_refused():
    with pytest.raises(CodecError, match="NaN or Inf"):  # 0x7F is NaN in e4m3fn
        LatentCodec().decode(make_frame("fp8", (2,), bytes([0x38, 0x7F]), qparams=[[1.0, 0.0]]))
    with pytest.raises(CodecError, match="NaN or Inf"):
        LatentCodec().decode(make_frame("int8", (2,), bytes(2), qparams=[[float("nan"), 0.0]]))
    with pytest.raises(CodecError, match="NaN or Inf"):  # finite params that overflow on decode
        LatentCodec().decode(make_frame("int8", (2,), bytes([0, 255]), qparams=[[3e38, 3e38]]))
    with pytest.raises(CodecError, match="negative"):
        LatentCodec().decode(make_frame("int8", (2,), bytes(2), qparams=[[-1.0, 0.0]]))


def test_encode_refuses_non_finite_and_non_float_latents():
    for bad in (torch.tensor([1.0, float("nan")]), torch.tensor([float("inf")])):
        for mode in MODES:
            with pytest.raises(CodecError, match="NaN or Inf"):
                LatentCodec(CodecSpec(mode)).encode(bad)
    with pytest.raises(CodecError, match="dtype"):
        LatentCodec().encode(torch.arange(4))
    with pytest.raises(CodecError, match="torch.Tensor"):
        LatentCodec().encode(np.zeros(4, np.float32))
    with pytest.raises(CodecError, match="dims"):
        LatentCodec().encode(torch.zeros([1] * 9))
    with pytest.raises(CodecError, match="magnitude"):
        LatentCodec(CodecSpec("int8")).encode(torch.tensor([0.0, 1e31]))


def test_checksum_mismatch_is_refused():
    frame = bytearray(LatentCodec(CodecSpec("fp16")).encode(latent((4, 4))))
    frame[-20] ^= 0x01  # inside the zstd payload, digest not updated
    with pytest.raises(CodecError, match="blake2b"):
        LatentCodec().decode(bytes(frame))
    frame = bytearray(LatentCodec(CodecSpec("int8")).encode(latent((1, 4, 4, 4))))
    frame[FIXED_HEADER_SIZE + 16 + 1] ^= 0x01  # a quant scale: would decode "fine" without the digest
    with pytest.raises(CodecError, match="blake2b"):
        LatentCodec().decode(bytes(frame))


def test_zstd_content_checksum_catches_payload_corruption_behind_a_resealed_digest():
    x = latent((64,))
    raw = x.numpy().tobytes()
    payload = bytearray(zstandard.ZstdCompressor(level=1, write_checksum=True).compress(raw))
    payload[-1] ^= 0xFF  # the zstd content checksum (last 4 bytes)
    with pytest.raises(CodecError, match="zstd"):
        LatentCodec().decode(make_frame("fp32", (64,), raw, zstd_payload=bytes(payload)))


@pytest.mark.parametrize(
    "override,message",
    [
        ({"magic": b"PNG\x00"}, "magic"),
        ({"version": 2}, "version"),
        ({"dtype_code": 9}, "allowlist"),
        ({"dtype_code": 2}, "does not match"),
        ({"order": ord(">")}, "byte order"),
        ({"flags": 0x8000}, "flag"),
        ({"axis": 0}, "quant axis"),
    ],
)
def test_bad_header_fields_are_refused(override, message):
    x = latent((4,))
    frame = make_frame("fp32", (4,), x.numpy().tobytes(), **override)
    with pytest.raises(CodecError, match=message):
        LatentCodec().decode(frame)


def test_unknown_mode_ndim_and_axis_are_refused():
    good = make_frame("int8", (2, 2), bytes(4), qparams=[[1, 0], [1, 0]], axis=0)
    assert LatentCodec().decode(good).shape == (2, 2)
    for offset, value, message in [(5, 200, "mode code"), (8, 9, "ndim"), (9, 2, "quant axis")]:
        bad = bytearray(good[:-16])
        bad[offset] = value
        with pytest.raises(CodecError, match=message):
            LatentCodec().decode(seal(bytes(bad)))


def test_shuffle_flag_on_single_byte_payload_is_refused():
    with pytest.raises(CodecError, match="shuffle"):
        LatentCodec().decode(make_frame("int8", (2,), bytes(2), qparams=[[1, 0]], shuffled=True))


def test_out_of_range_codes_are_refused():
    with pytest.raises(CodecError, match="codes"):
        LatentCodec().decode(make_frame("int5", (2,), bytes([3, 32]), qparams=[[1, 0]]))


@pytest.mark.parametrize("cut", [0, 3, FIXED_HEADER_SIZE - 1, FIXED_HEADER_SIZE + 2, -17, -1])
def test_truncated_frames_are_refused(cut):
    frame = LatentCodec(CodecSpec("int8")).encode(latent((1, 4, 8, 8)))
    with pytest.raises(CodecError, match="truncated"):
        LatentCodec().decode(frame[:cut])


def test_non_bytes_frames_are_refused():
    for bad in ("SGLC", None, 12, [1, 2]):
        with pytest.raises(CodecError):
            LatentCodec().decode(bad)
    frame = LatentCodec(CodecSpec("fp32")).encode(latent((4,)))
    assert LatentCodec().decode(bytearray(frame)).shape == (4,)
    assert LatentCodec().decode(memoryview(frame)).shape == (4,)


# ------------------------------------------------------------------------------------------------------
# Fuzzing: random and mutated frames; the only allowed exception is CodecError
# ------------------------------------------------------------------------------------------------------


def _seed_frames() -> list[bytes]:
    frames = []
    for i, mode in enumerate(MODES):
        shape = [(1, 4, 6, 5), (3, 7), (9,), (), (2, 3, 2)][i % 5]
        frames.append(LatentCodec(CodecSpec(mode, level=1)).encode(latent(shape, seed=i)))
    return frames


SEED_FRAMES = _seed_frames()


def _examples(n: int) -> int:
    """Hypothesis examples per fuzz test: bounded for CI; CODEC_FUZZ_SCALE=20 for a long hunt."""
    return max(1, int(n * float(os.environ.get("CODEC_FUZZ_SCALE", "1"))))


FUZZ_CODEC = LatentCodec(max_decoded_bytes=2**20)


def _decode_or_codec_error(frame: bytes) -> None:
    try:
        out = FUZZ_CODEC.decode(frame)
    except CodecError:
        return
    assert isinstance(out, torch.Tensor) and bool(torch.isfinite(out.float()).all())


@settings(max_examples=_examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(data):
    _decode_or_codec_error(data)
    _decode_or_codec_error(b"SGLC\x01" + data)


MUTATION = st.tuples(st.floats(0, 1), st.integers(0, 255), st.sampled_from(["set", "xor", "ins", "del"]))


def _mutate(frame: bytearray, edits: list[tuple[float, int, str]], start: int = 0) -> bytearray:
    """Apply byte edits at relative positions in frame[start:]."""
    for rel, value, op in edits:
        p = start + int(rel * (len(frame) - start))
        if op == "ins":
            frame.insert(p, value)
        elif p < len(frame):
            if op == "set":
                frame[p] = value
            elif op == "xor":
                frame[p] ^= value or 1
            else:
                del frame[p]
    return frame


@settings(max_examples=_examples(400), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(range(len(SEED_FRAMES))),
    st.lists(MUTATION, max_size=4),
    st.just(0) | st.integers(-40, 40),
    st.booleans(),
)
def test_fuzz_mutated_frames(index, edits, cut, reseal):
    frame = _mutate(bytearray(SEED_FRAMES[index][:-DIGEST_SIZE]), edits)
    if cut < 0:
        frame = frame[:cut]
    elif cut > 0:
        frame += bytes(cut)
    body = bytes(frame)
    # resealing (a correct digest over mutated content) lets mutations reach the deep checks
    _decode_or_codec_error(seal(body) if reseal else body + SEED_FRAMES[index][-DIGEST_SIZE:])


@settings(max_examples=_examples(400), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(len(SEED_FRAMES))), st.lists(MUTATION, min_size=1, max_size=3))
def test_fuzz_mutated_payloads_behind_a_valid_header(index, edits):
    """Mutate only quant params and the zstd payload, then reseal: exercises zstd, NaN and code checks."""
    frame = SEED_FRAMES[index]
    start = parse_header(frame).header_length - 8 * parse_header(frame).channels
    _decode_or_codec_error(seal(bytes(_mutate(bytearray(frame[:-DIGEST_SIZE]), edits, start))))


@st.composite
def hostile_headers(draw):
    """Frames whose header fields are mostly right, each one sometimes wrong."""
    mode = draw(st.sampled_from(MODES))
    shape = draw(
        st.lists(st.integers(0, 5), max_size=4).map(tuple) | st.lists(st.integers(0, 2**32 - 1), max_size=9).map(tuple)
    )
    numel = math.prod(shape)
    size = {"fp32": 4 * numel, "fp16": 2 * numel, "bf16": 2 * numel, "int4": (numel + 1) // 2}.get(mode, numel)
    fill = draw(st.integers(0, 2**32 - 1))
    length = draw(st.just(min(size, 4096)) | st.integers(0, 64))
    raw = np.random.default_rng(fill).integers(0, 256, length, dtype=np.uint8).tobytes()
    axis = draw(st.sampled_from([None, 0, 1, 2, 9]))
    channels = 1 if axis is None else (shape[axis] if axis < len(shape) else 1)
    n_q = 0 if mode in LOSSLESS_MODES else 2 * min(channels, 16)
    floats = st.floats(width=32) | st.floats(0, 10, width=32)
    qparams = draw(st.lists(floats, min_size=n_q, max_size=n_q) | st.lists(floats, max_size=8))
    return dict(
        mode=mode,
        shape=shape,
        raw=raw,
        qparams=np.asarray(qparams, dtype="<f4"),
        axis=axis,
        shuffled=draw(st.booleans()),
        raw_len=draw(st.none() | st.just(min(size, 2**64 - 1)) | st.integers(0, 2**64 - 1)),
        dtype_code=draw(st.none() | st.integers(0, 7)),
        order=draw(st.sampled_from([ord("<"), ord("<"), ord(">"), 0])),
    )


@settings(max_examples=_examples(400), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_headers())
def test_fuzz_structured_headers(fields):
    _decode_or_codec_error(make_frame(**fields))


@settings(max_examples=_examples(150), deadline=None)
@given(
    mode=st.sampled_from(MODES),
    shape=st.lists(st.integers(0, 6), max_size=5).map(tuple),
    scale=st.floats(1e-6, 1e6),
)
def test_fuzz_round_trip_property(mode, shape, scale):
    x = latent(shape) * scale
    if mode == "fp16":
        x = x.clamp(-60000, 60000)
    y = LatentCodec(CodecSpec(mode)).decode(LatentCodec(CodecSpec(mode)).encode(x))
    assert y.shape == x.shape
    if mode == "fp32":
        assert torch.equal(y, x)


# ------------------------------------------------------------------------------------------------------
# Chunks and negotiation
# ------------------------------------------------------------------------------------------------------


def test_split_and_join_chunks_round_trip():
    frame = LatentCodec(CodecSpec("fp32", level=1)).encode(latent((1, 4, 64, 64)))
    chunks = split_chunks(frame, chunk_size=10_000)
    assert all(len(c) <= 10_000 for c in chunks) and len(chunks) == -(-len(frame) // 10_000)
    assert join_chunks(chunks) == frame
    assert split_chunks(frame) == [frame]  # default 256 KiB
    assert split_chunks(b"") == [b""]
    header = parse_header(chunks[0])  # the first chunk tells the receiver the exact frame length
    assert header.frame_length == len(frame)


def test_chunk_arguments_and_join_cap():
    with pytest.raises(CodecError):
        split_chunks(b"abc", chunk_size=0)
    with pytest.raises(CodecError, match="exceeds"):
        join_chunks([b"a" * 10, b"b" * 10], max_frame_bytes=15)
    assert join_chunks([b"a" * 10, b"b" * 5], max_frame_bytes=15) == b"a" * 10 + b"b" * 5  # the cap itself fits


def test_negotiate_picks_the_servers_first_preference_the_device_accepts():
    assert negotiate(["fp16", "int4"], ["int4", "int8", "fp16"]) == "int4"
    assert negotiate(["fp16", "int8"], ["int4", "int8", "fp16"]) == "int8"
    assert negotiate(["zz-future-mode", "fp32"], ["fp16", "fp32"]) == "fp32"


def test_negotiate_refuses_when_nothing_matches_or_the_server_is_misconfigured():
    with pytest.raises(CodecError, match="no common"):
        negotiate(["fp32"], ["int4", "fp16"])
    with pytest.raises(CodecError, match="no common"):
        negotiate(["zz-future-mode"], ["fp16"])


def test_negotiate_empty_accepted_means_any_lossless_and_default_preference():
    assert negotiate([], ["int4", "fp16", "fp32"]) == "fp16"
    with pytest.raises(CodecError, match="no common"):
        negotiate([], ["int4", "int8"])
    assert negotiate(list(MODES)) == DEFAULT_PREFERENCE[0] == RECOMMENDED_LOSSY_MODE
    assert negotiate([]) in LOSSLESS_MODES
    assert set(DEFAULT_PREFERENCE) <= set(MODES)
    with pytest.raises(CodecError, match="unknown"):
        negotiate(["fp16"], ["webp"])


# ------------------------------------------------------------------------------------------------------
# The benchmark keeps working (latent part only; the image part is exercised by tests/test_bench_codec.py)
# ------------------------------------------------------------------------------------------------------


def test_benchmark_quick_latent_part_runs():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_codec.py"
    spec = importlib.util.spec_from_file_location("bench_codec_under_test", path)
    bench_codec = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench_codec  # dataclasses look their module up there
    spec.loader.exec_module(bench_codec)
    result = bench_codec.main(["--quick", "--no-images", "--repeats", "1"])
    rows = {r["mode"]: r for r in result["latents"]}
    assert set(rows) == set(MODES)
    assert math.isinf(rows["fp32"]["snr_db"]) and rows["fp32"]["max_abs_err"] == 0
    assert rows["int8"]["snr_db"] > rows["int4"]["snr_db"] > 10
    assert result["finished_image_bytes"]["synthetic"]["png"] > 0
