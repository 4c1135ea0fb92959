"""Every command line's help says what its authors wrote: typer renders help with rich markup, which drops any
'[word]' it takes for a style tag (the 'sim' extra once read "needs the  extra")."""

from __future__ import annotations

import re
from typing import Any

import pytest
import typer

from device_client.cli import main as device_app
from edge_server.cli import app as server_app
from sage_core.cli import app as edge_app
from simulation.cli import main as sim_app
from training.cli import app as train_app

MARKUP_TAG = re.compile(r"\[/?[A-Za-z#][^\]\[]*\]")  # what rich would read as a tag ('[red]', '[/]', '[sim]')


def help_texts(command: Any, path: str) -> list[tuple[str, str]]:
    """(where, text) for a command's help and its options', its subcommands' too."""
    texts = [(path, command.help or "")]
    texts += [(f"{path} {p.name}", getattr(p, "help", None) or "") for p in command.params]
    for name, sub in getattr(command, "commands", {}).items():  # a group's subcommands
        texts += help_texts(sub, f"{path} {name}")
    return texts


@pytest.mark.parametrize(
    "name, app",
    [("sage-edge", edge_app), ("sage-edge-server", server_app), ("sage-device", device_app),
     ("sage-train", train_app), ("sage-sim", sim_app)],
)
def test_help_texts_hold_no_markup_tags(name, app):
    texts = help_texts(typer.main.get_command(app), name)
    assert len(texts) > 5
    tagged = [(where, text) for where, text in texts if MARKUP_TAG.search(text)]
    assert not tagged, tagged


@pytest.mark.parametrize("module",
                         ["sage_core.cli", "edge_server.cli", "device_client.cli", "simulation.cli", "training.cli"])
def test_help_answers_without_torch(module):
    """Every command line's `--help` answers at once: its module imports no torch (seconds here); the commands
    import it when they run."""
    import subprocess
    import sys
    from pathlib import Path

    code = f"import sys, {module}; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]
