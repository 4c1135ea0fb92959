"""Two compiled workers in one process, as bench_policy_quality's 'adaptive + compiled' then 'adaptive + fp8-rowwise'
run them: how many compiled variants TorchDynamo holds for UNet2DConditionModel.forward after each, with the warm-up's
room for every bucket ('new') and without it ('old', the code before the eighth session).

    python docs/results/serving/dynamo_limit_probe.py old; python docs/results/serving/dynamo_limit_probe.py new

(shipped model, five default buckets per worker, compiled with Inductor's CPU backend; output in
dynamo_limit_probe.txt)
"""

import contextlib
import sys

import sage_core.unet_buckets as ub
from edge_server.config import build_config
from edge_server.worker import EdgeWorker

if sys.argv[1:] == ["old"]:
    ub.room_for_buckets = lambda n: contextlib.nullcontext()
for quantize in ("none", "fp8-rowwise"):
    EdgeWorker(build_config(None, {"model": "default", "unet_compile": "default", "unet_quantize": quantize,
                                   "ray_num_cpus": 2}))
    print(f"{sys.argv[1]}: after the {quantize} worker: {ub.compiled_variants()} compiled variants", flush=True)
