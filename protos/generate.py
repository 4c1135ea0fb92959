"""Generate the Python code for every .proto under ``protos/`` with grpc_tools.protoc.

One command: ``python -m protos.generate`` (from the repository root). The repository root is the proto path, so
the generated modules import each other as ``protos.sage_edge.v1.edge_pb2`` and the package works installed or not.
``--out DIR`` writes into another root (the staleness test compares such a fresh copy byte for byte).
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

PROTOS_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTOS_DIR.parent


def proto_sources(root: Path = REPO_ROOT) -> list[Path]:
    """All .proto files under ``root/protos``, relative to ``root``, sorted."""
    return sorted(p.relative_to(root) for p in (root / "protos").rglob("*.proto"))


def generate(out_root: Path, root: Path = REPO_ROOT) -> list[Path]:
    """Run protoc on every proto source; write ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` under out_root.

    Returns the generated files (absolute paths). Raises RuntimeError if protoc fails.
    """
    from grpc_tools import protoc

    sources = proto_sources(root)
    if not sources:
        raise RuntimeError(f"no .proto files under {root / 'protos'}")
    out_root.mkdir(parents=True, exist_ok=True)
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"--proto_path={root}",
        f"--proto_path={well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(s) for s in sources],
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}: {' '.join(args)}")
    generated: list[Path] = []
    for src in sources:
        stem = out_root / src.parent / src.stem
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            path = stem.with_name(stem.name + suffix)
            if not path.exists():
                raise RuntimeError(f"protoc did not write {path}")
            generated.append(path)
    return generated


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: regenerate in place (default) or into ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: the repository root)")
    ns = parser.parse_args(argv)
    for path in generate(ns.out.resolve()):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
