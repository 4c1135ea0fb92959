"""UNet variants timed by hand in the fourth H100 lease (output: h100_fp8_probe_4.txt); the same statements as the
script that ran, laid out for the linter. Superseded by `python -m benchmarks.bench_unet`."""

import time

import torch
import torch._dynamo.utils as du

from sage_core.models import sd15_architecture_pipeline
from sage_core.unet_buckets import fuse_layout, quantize_unet

pipe = sd15_architecture_pipeline()
unet = pipe.unet.to("cuda", torch.float16).eval()
x = torch.randn(64, 4, 64, 64, device="cuda", dtype=torch.float16)
c = torch.randn(64, 77, 768, device="cuda", dtype=torch.float16)
t = torch.full((64,), 500, device="cuda")


def ms(f, n=5):
    with torch.inference_mode():
        f(x, t, encoder_hidden_states=c)
        torch.cuda.synchronize()
        s = time.perf_counter()
        for _ in range(n):
            f(x, t, encoder_hidden_states=c)
        torch.cuda.synchronize()
    return (time.perf_counter() - s) / n / 64 * 1e3


print("eager fp16 ms/sample", round(ms(unet), 3), flush=True)
fuse_layout(unet)
print("eager fused cl ms/sample", round(ms(unet), 3), flush=True)
quantize_unet(unet, "fp8")
print("eager fp8 ms/sample", round(ms(unet), 3), flush=True)
s = time.perf_counter()
comp = torch.compile(unet, mode="default", dynamic=False)
try:
    with torch.inference_mode():
        comp(x, t, encoder_hidden_states=c)
        torch.cuda.synchronize()
    print("fp8 compile default first call s", round(time.perf_counter() - s, 1), flush=True)
    print("compiled fp8 ms/sample", round(ms(comp), 3), flush=True)
finally:
    print(du.compile_times(repr="str", aggregate=True), flush=True)
