"""The edge server with the adaptive sharing policy and the cross-window latent cache (real server process)."""

from __future__ import annotations

import grpc
import pytest
from server_fixtures import start_edge_server

from protos.sage_edge.v1 import edge_pb2, edge_pb2_grpc

STEPS = 8


@pytest.fixture(scope="module")
def server():
    proc = start_edge_server("--sharing", "adaptive", "--cache-mb", "16", "--max-wait-ms", "20")
    yield proc
    proc.terminate()


def ask(stub, prompt: str, **fields) -> edge_pb2.Accepted:
    """Accepted of one request (the rest of the stream is read and dropped)."""
    req = edge_pb2.ImageRequest(prompt=prompt, steps=STEPS, share=1.0, accepted_codecs=["fp32"], **fields)
    accepted, done = None, None
    for msg in stub.RequestImage(req, timeout=120):
        kind = msg.WhichOneof("kind")
        accepted = msg.accepted if kind == "accepted" else accepted
        done = msg.done if kind == "done" else done
    assert accepted is not None and done is not None
    return accepted


def test_second_window_reuses_the_cached_latent_and_seeds_and_settings_are_honoured(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = edge_pb2_grpc.EdgeSamplerStub(channel)
        first = ask(stub, "a red circle on the left")
        # a singleton is its own tightest group: similarity 1 -> the schedule's deepest share (0.5)
        assert first.cached_steps == 0 and first.branch_step == STEPS // 2
        again = ask(stub, "a red circle on the left")
        assert again.cached_steps == again.branch_step == STEPS // 2
        assert again.seed == first.seed  # it continues the cached trajectory, whose noise that seed made
        seeded = ask(stub, "a red circle on the left", seed=987654)
        assert seeded.cached_steps == 0 and seeded.seed == 987654
        other_steps = edge_pb2.ImageRequest(prompt="a red circle on the left", steps=STEPS + 2, share=1.0)
        msgs = list(stub.RequestImage(other_steps, timeout=120))
        assert msgs[0].accepted.cached_steps == 0
        unrelated = ask(stub, "zebra stripes under water at night")
        assert unrelated.cached_steps == 0
        # a latent made under another negative prompt (guidance's other half) is no start for this one, and back
        negative = ask(stub, "a red circle on the left", negative_prompt="blurry")
        assert negative.cached_steps == 0 and negative.negative_prompt == "blurry"
        assert ask(stub, "a red circle on the left", negative_prompt="blurry").cached_steps == STEPS // 2
        assert ask(stub, "a red circle on the left").cached_steps == STEPS // 2
