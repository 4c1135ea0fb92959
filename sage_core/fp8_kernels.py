"""Float8 Triton kernels for the static float8 UNet (`sage_core.fp8`), where a fused kernel moves fewer bytes or
uses float8 tensor cores where ATen has none. Imported only where Triton runs them: on a CUDA GPU, or on the CPU
under TRITON_INTERPRET=1 (the tests).

- `geglu_fp8`: one pass from a feed-forward block's float8 input to the float8 input of its output projection.
  diffusers' GEGLU is `h, g = (x @ W.T + b).chunk(2); h * gelu(g)`. Unfused, the GEMM writes both halves (2N
  channels) in half precision and an elementwise kernel reads them back to write N. Here each program computes the
  same tile of both halves (two accumulators over one read of x), applies the bias, the exact (erf) GELU and the
  product, and writes only the product's float8 codes with the next layer's input scale.
- `conv3x3_fp8`: a 3x3 convolution (stride 1, padding 1) over channels-last float8 codes as an implicit GEMM: the
  reduction runs over the 9 taps x input channels, each tap's rows read straight from the input with the image's
  edges masked to zero (no im2col buffer); one scale per output channel for the weights, the bias in the epilogue,
  the UNet's dtype out. ATen has no float8 convolution, and the UNet's 3x3 convolutions are 28 % of its compiled
  fp16 time on the H100.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton


def require_dense(**tensors: torch.Tensor) -> None:
    """Refuse operands that are not dense and row-major: the kernels index them by their shapes alone."""
    strided = [name for name, t in tensors.items() if not t.is_contiguous()]
    if strided:
        raise ValueError(f"the float8 kernels take dense row-major operands; {', '.join(strided)} "
                         "strided (call .contiguous() first)")


@triton.jit
def geglu_fp8_kernel(x_ptr, w_ptr, b_ptr, x_scale_ptr, w_scale_ptr, out_scale_ptr, out_ptr, M, N, K,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[M, N] = fp8((h * gelu(g)) / out_scale), [h | g] = x[M, K] @ w[2N, K].T * x_scale * w_scale + b[2N].

    Programs run along N first, so the ones that read the same rows of x run together and find them in L2."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    rows = (pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    depth = tl.arange(0, BLOCK_K)
    acc_h = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + depth
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K),
                    other=0.0)
        w_mask = (ks[:, None] < K) & (cols[None, :] < N)  # w's rows n and N + n, read as (k, n) tiles
        w_h = tl.load(w_ptr + cols[None, :] * K + ks[:, None], mask=w_mask, other=0.0)
        w_g = tl.load(w_ptr + (cols[None, :] + N) * K + ks[:, None], mask=w_mask, other=0.0)
        acc_h = tl.dot(x, w_h, acc_h)
        acc_g = tl.dot(x, w_g, acc_g)
    scale = tl.load(x_scale_ptr) * tl.load(w_scale_ptr)
    in_n = cols < N
    h = acc_h * scale + tl.load(b_ptr + cols, mask=in_n, other=0.0)[None, :]
    g = acc_g * scale + tl.load(b_ptr + N + cols, mask=in_n, other=0.0)[None, :]
    y = h * (0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476)))
    codes = tl.clamp(y / tl.load(out_scale_ptr), -448.0, 448.0)  # float8 e4m3's finite range
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], codes.to(tl.float8e4nv),
             mask=(rows[:, None] < M) & in_n[None, :])


GEGLU_TUNED = triton.autotune(  # tile shapes for Hopper's float8 tensor cores; the first call of a shape picks one
    configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
             for m, n, k, w, s in ((128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                                   (128, 128, 128, 8, 3))],
    key=["M", "N", "K"],
)(geglu_fp8_kernel)


def launch_geglu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                 out_scale: torch.Tensor, blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Run the kernel on row-major x (M, K) and w (2N, K) codes with float32 b (2N,) and 0-dim float32 scales;
    `blocks` (BLOCK_M, BLOCK_N, BLOCK_K) fixes the tiles (the interpreter's tests), else they are tuned."""
    require_dense(x=x, w=w, b=b)
    m, k = x.shape
    n = w.shape[0] // 2
    out = torch.empty(m, n, device=x.device, dtype=torch.float8_e4m3fn)
    if blocks is None:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        wrap_triton(GEGLU_TUNED)[grid](x, w, b, x_scale, w_scale, out_scale, out, m, n, k)
    else:
        bm, bn, bk = blocks
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        wrap_triton(geglu_fp8_kernel)[grid](x, w, b, x_scale, w_scale, out_scale, out, m, n, k,
                                            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return out


@triton_op("sage_edge::geglu_fp8", mutates_args=())
def geglu_fp8(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
              out_scale: torch.Tensor) -> torch.Tensor:
    """The fused float8 GEGLU as a custom op that torch.compile sees into (its Triton kernel goes into the
    compiled graph, CUDA graphs included)."""
    return launch_geglu(x, w, b, x_scale, w_scale, out_scale)


@triton.jit
def conv3x3_fp8_kernel(x_ptr, w_ptr, b_ptr, x_scale_ptr, w_scale_ptr, out_ptr, P, H, W, C, F,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[P, F] = conv3x3(x)[P, F] * x_scale * w_scale[F] + b[F] over P = batch x H x W channels-last pixels: x
    (P, C) and w (F, 3, 3, C) float8 codes, C a multiple of BLOCK_K (a K-chunk never straddles two taps)."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(F, BLOCK_N)
    pix = (pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_w, row_h = pix % W, (pix // W) % H
    in_pix, in_cols = pix < P, cols < F
    depth = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, 9 * C, BLOCK_K):
        tap = kk // C
        dh, dw = tap // 3 - 1, tap % 3 - 1
        c0 = kk - tap * C
        h, w = row_h + dh, col_w + dw
        inside = in_pix & (h >= 0) & (h < H) & (w >= 0) & (w < W)  # zero padding at the image's edges
        src = pix + dh * W + dw  # the same image's pixel (h, w)
        x = tl.load(x_ptr + src[:, None] * C + (c0 + depth)[None, :], mask=inside[:, None], other=0.0)
        wt = tl.load(w_ptr + cols[None, :] * (9 * C) + (kk + depth)[:, None], mask=in_cols[None, :], other=0.0)
        acc = tl.dot(x, wt, acc)
    scale = tl.load(x_scale_ptr) * tl.load(w_scale_ptr + cols, mask=in_cols, other=0.0)
    y = acc * scale[None, :] + tl.load(b_ptr + cols, mask=in_cols, other=0.0)[None, :]
    tl.store(out_ptr + pix[:, None] * F + cols[None, :], y.to(out_ptr.dtype.element_ty),
             mask=in_pix[:, None] & in_cols[None, :])


CONV_BLOCK_K = 64  # the reduction's chunk: the input channels must be a multiple of it
CONV_TUNED = triton.autotune(  # SD's output channels are 320, 640 or 1280: 64-wide tiles cover them exactly
    configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": CONV_BLOCK_K}, num_warps=w, num_stages=s)
             for m, n, w, s in ((128, 128, 8, 4), (128, 64, 4, 4), (256, 64, 8, 3), (128, 256, 8, 3))],
    key=["P", "H", "W", "C", "F"],
)(conv3x3_fp8_kernel)


def launch_conv3x3(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                   out_dtype: torch.dtype, blocks: tuple[int, int] | None = None) -> torch.Tensor:
    """Run the convolution kernel on channels-last codes x (N, H, W, C) and w (F, 3, 3, C) with float32 b (F,),
    a 0-dim x_scale and w_scale (F,); returns (N, H, W, F) in `out_dtype`. `blocks` (BLOCK_M, BLOCK_N) fixes the
    tiles (the interpreter's tests), else they are tuned."""
    require_dense(x=x, w=w, b=b, w_scale=w_scale)
    n, h, width, c = x.shape
    if c % CONV_BLOCK_K:  # a chunk would straddle two taps: the kernel would read the wrong weights silently
        raise ValueError(f"the float8 convolution takes input channels in multiples of {CONV_BLOCK_K}, got {c}")
    f = w.shape[0]
    p = n * h * width
    out = torch.empty(n, h, width, f, device=x.device, dtype=out_dtype)
    if blocks is None:
        grid = lambda meta: (triton.cdiv(p, meta["BLOCK_M"]) * triton.cdiv(f, meta["BLOCK_N"]),)  # noqa: E731
        wrap_triton(CONV_TUNED)[grid](x, w, b, x_scale, w_scale, out, p, h, width, c, f)
    else:
        bm, bn = blocks
        grid = (triton.cdiv(p, bm) * triton.cdiv(f, bn),)
        wrap_triton(conv3x3_fp8_kernel)[grid](x, w, b, x_scale, w_scale, out, p, h, width, c, f,
                                              BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=CONV_BLOCK_K)
    return out


@triton_op("sage_edge::conv3x3_fp8", mutates_args=())
def conv3x3_fp8(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                out_dtype: torch.dtype) -> torch.Tensor:
    """The float8 3x3 convolution as a custom op that torch.compile sees into."""
    return launch_conv3x3(x, w, b, x_scale, w_scale, out_dtype)
