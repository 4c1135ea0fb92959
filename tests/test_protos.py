"""The generated protobuf/gRPC code is in sync with the .proto sources (``python -m protos.generate``)."""

from __future__ import annotations

from pathlib import Path

from protos.generate import REPO_ROOT, generate


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    """Regenerating into a temp dir gives byte-identical files; otherwise run ``python -m protos.generate``."""
    fresh = generate(tmp_path)
    assert fresh, "no generated files"
    stale = []
    for path in fresh:
        committed = REPO_ROOT / path.relative_to(tmp_path)
        if not committed.exists() or committed.read_bytes() != path.read_bytes():
            stale.append(str(committed.relative_to(REPO_ROOT)))
    assert not stale, f"generated code is stale, run `python -m protos.generate`: {stale}"


def test_generated_imports_resolve() -> None:
    """The generated modules import as ``protos.sage_edge.v1`` and expose the service."""
    from protos.sage_edge.v1 import edge_pb2, edge_pb2_grpc

    assert edge_pb2.DESCRIPTOR.package == "sage_edge.v1"
    assert hasattr(edge_pb2_grpc, "EdgeSamplerStub")
    assert edge_pb2.DESCRIPTOR.services_by_name["EdgeSampler"].methods_by_name["RequestImage"].server_streaming
    msg = edge_pb2.ImageResponse(accepted=edge_pb2.Accepted(group_size=2))
    assert msg.WhichOneof("kind") == "accepted"
