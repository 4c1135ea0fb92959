"""benchmarks.bench_simulation refuses a --modes list it cannot run with one line and exit 2, before any work."""

from __future__ import annotations

import pytest

from benchmarks import bench_simulation


@pytest.mark.parametrize(
    ("modes", "message"),
    [
        ("sage,sage", "error: modes must name each mode once, got sage, sage"),
        ("sage,server,sage", "error: modes must name each mode once, got sage, server, sage"),
        ("sage,cloud", "error: modes: unknown mode 'cloud' (known: sage, server, device, sage_server)"),
    ],
)
def test_bad_modes_are_refused_before_any_work(modes, message, capsys, monkeypatch):
    """A mode named twice was simulated twice and reported once."""

    def no_work(*args, **kwargs):
        raise AssertionError("the prompts were loaded for a --modes list that must be refused")

    monkeypatch.setattr(bench_simulation, "load_prompts", no_work)
    assert bench_simulation.main(["--modes", modes, "--requests", "10", "--embedder", "hashed"]) == 2
    captured = capsys.readouterr()
    assert captured.err == message + "\n" and captured.out == ""
