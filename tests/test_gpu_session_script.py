"""scripts/gpu_session.sh hands its files back through the device tool, which returns at most 8 files from $OUT:
on exit it packs everything but the files read first into one archive (run here with no stage to do)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_session_hands_back_its_outputs_in_at_most_eight_files(tmp_path):
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    produced = [f"variant_{i}.{ext}" for i in range(5) for ext in ("log", "kernels.txt")] + ["logs/x.compile.log"]
    kept = ["variants.json", "variants_kernels.png", "bench_serving_best.json", "pipeline.tar.part-aa"]
    for name in produced + kept:
        (out / name).write_text(name)
    env = {**os.environ, "OUT": str(out), "STAGES": "none", "WHEELS": "none", "PYTHON": sys.executable,
           "HOME": str(tmp_path)}
    run = subprocess.run(["bash", "scripts/gpu_session.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert left == sorted([*kept, "lease_files.tgz", "session.log"])
    with tarfile.open(out / "lease_files.tgz") as tar:
        assert sorted(tar.getnames()) == sorted(produced)
        assert tar.extractfile("logs/x.compile.log").read() == b"logs/x.compile.log"
