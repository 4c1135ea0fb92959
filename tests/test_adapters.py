"""SAGE adapters at inference (sage_core.adapters): which folder "auto" picks, and the edge server applying it."""

from __future__ import annotations

import pytest
import torch
from lora_fixtures import make_lora, make_shipped_lora

from sage_core.adapters import AdapterMismatchError, load_adapter, resolve_adapter
from sage_core.models import ModelError, model_fingerprint, tiny_pipeline


def test_auto_picks_the_shipped_adapter_only_for_its_base_model(tmp_path):
    base = model_fingerprint(tiny_pipeline(seed=0))
    shipped = tmp_path / "sage_adapter"
    assert resolve_adapter("auto", base, shipped) is None  # nothing shipped
    make_shipped_lora(shipped, base)
    assert resolve_adapter("auto", base, shipped) == shipped
    assert resolve_adapter("auto", "another-model", shipped) is None  # made for another model: not applied
    assert resolve_adapter("none", base, shipped) is None
    with pytest.raises(AdapterMismatchError, match=f"trained on base model {base}, not on the loaded model "
                       "another-model"):  # named explicitly: still refused for another base model
        resolve_adapter(str(shipped), "another-model", shipped)
    assert resolve_adapter(str(shipped), base, shipped) == shipped
    with pytest.raises(ModelError, match="does not exist"):
        resolve_adapter(str(tmp_path / "nope"), base, shipped)


def test_an_explicit_folder_for_another_base_model_is_refused_by_load_adapter(tmp_path):
    import json

    from sage_core.adapters import INFO_FILE

    other = model_fingerprint(tiny_pipeline(seed=1))  # same architecture, other weights: the shapes fit
    folder = tmp_path / "lora"
    make_shipped_lora(folder, other)
    pipe = tiny_pipeline(seed=0)
    with pytest.raises(AdapterMismatchError, match=f"base model {other}, not on the loaded model "
                       f"{model_fingerprint(pipe)}.*remove base_model_fingerprint"):
        load_adapter(pipe, folder)
    assert not getattr(pipe.unet, "peft_config", None)  # refused before anything was loaded
    # the documented opt-in: a folder that records no base model is checked by its shapes only
    info = json.loads((folder / INFO_FILE).read_text())
    info.pop("base_model_fingerprint")
    (folder / INFO_FILE).write_text(json.dumps(info))
    assert load_adapter(pipe, folder) > 0


def test_peft_key_names_load_and_mixed_key_names_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    peft_dir = make_lora(tmp_path / "peft", peft_keys=True)
    weights = load_file(f"{peft_dir}/pytorch_lora_weights.safetensors")
    assert all(".lora_A." in k or ".lora_B." in k for k in weights)
    pipe = tiny_pipeline(seed=0)
    assert load_adapter(pipe, peft_dir) == len(weights) // 2
    mixed = {k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up.") if ".attn1." in k else k: v
             for k, v in weights.items()}
    (tmp_path / "mixed").mkdir()
    save_file(mixed, str(tmp_path / "mixed" / "pytorch_lora_weights.safetensors"))
    with pytest.raises(AdapterMismatchError, match="mixes 'lora_A/lora_B' and 'lora.down/lora.up' keys"):
        load_adapter(tiny_pipeline(seed=0), tmp_path / "mixed")


def test_edge_worker_runs_the_shared_phase_with_the_adapter(tmp_path):
    from edge_server.config import ServerConfig
    from edge_server.worker import EdgeWorker

    adapter = make_lora(tmp_path / "lora")
    threads = torch.get_num_threads()
    plain = EdgeWorker(ServerConfig(model="tiny", dtype="float32", adapter="none", ray_num_cpus=1))
    adapted = EdgeWorker(ServerConfig(model="tiny", dtype="float32", adapter=adapter, ray_num_cpus=1))
    torch.set_num_threads(threads)
    assert plain.adapter == "none" and adapted.adapter == adapter
    assert adapted.fingerprint == plain.fingerprint  # devices check the base model's identity
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    c = torch.randn(2, 77, plain.pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500, 500])
    with torch.no_grad():
        assert not torch.allclose(plain.pipe.unet(x, t, c).sample, adapted.pipe.unet(x, t, c).sample)
        merged = adapted.pipe.unet(x, t, c).sample
    # the server merges the LoRA into the weights: same output as the pipeline with the adapter loaded as layers
    assert not getattr(adapted.pipe.unet, "peft_config", None)
    layered = tiny_pipeline(seed=0)
    load_adapter(layered, adapter)
    with torch.no_grad():
        torch.testing.assert_close(merged, layered.unet(x, t, c).sample, rtol=1e-4, atol=1e-5)


def test_an_adapter_for_another_base_model_is_refused_by_the_server(tmp_path):
    from edge_server.config import ServerConfig
    from edge_server.worker import EdgeWorker
    from sage_core.models import DEFAULT_MODEL_DIR

    adapter = make_lora(tmp_path / "lora")  # made for the tiny UNet
    config = ServerConfig(model=str(DEFAULT_MODEL_DIR), dtype="float32", adapter=adapter, ray_num_cpus=1)
    worker = EdgeWorker(config, first_start=True)  # at the server's start: kept for the one-line error
    assert "another base model" in worker.failure()
    with pytest.raises(ModelError, match="another base model"):
        worker.info()
    with pytest.raises(AdapterMismatchError, match="another base model"):  # later (a replacement): the actor dies,
        EdgeWorker(config)  # as the engine's watch and revival expect; a model-less actor would fail every window


def test_a_server_given_an_adapter_of_another_model_says_so_in_one_line(tmp_path):
    """`serve --adapter DIR` with an adapter whose sage_adapter.json names another base model exits 2 with one
    `error:` line, as docs/training.md says. The worker's ModelError used to kill the actor in its __init__, and
    Ray printed the actor's traceback before that line."""
    import json
    import shutil
    import subprocess
    import sys

    from server_fixtures import REPO_ROOT, server_env

    from sage_core.adapters import DEFAULT_ADAPTER_DIR

    adapter = str(shutil.copytree(DEFAULT_ADAPTER_DIR, tmp_path / "adapter"))  # the shipped model's, relabelled
    info = tmp_path / "adapter" / "sage_adapter.json"
    info.write_text(json.dumps({**json.loads(info.read_text()), "base_model_fingerprint": "0123456789abcdef"}))
    done = subprocess.run([sys.executable, "-m", "edge_server", "serve", "--model", "default", "--port", "0",
                           "--ray-num-cpus", "1", "--adapter", adapter], cwd=REPO_ROOT, env=server_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"error: the model worker could not start: the adapter in {adapter} was trained on base model " \
           "0123456789abcdef" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and 'File "' not in done.stderr, done.stderr


def test_the_shipped_adapter_fits_the_default_model_and_changes_its_unet():
    from sage_core.adapters import DEFAULT_ADAPTER_DIR, load_adapter
    from sage_core.models import load_pipeline

    pipe = load_pipeline()
    folder = resolve_adapter("auto", model_fingerprint(pipe))
    assert folder == DEFAULT_ADAPTER_DIR, "the shipped SAGE adapter is missing or was made for another model"
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    c = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([700, 300])
    with torch.no_grad():
        before = pipe.unet(x, t, c).sample
        assert load_adapter(pipe, folder) > 0
        after = pipe.unet(x, t, c).sample
    assert not torch.allclose(before, after, atol=1e-5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--adapter", "/nonexistent/lora"], "error: LoRA folder /nonexistent/lora does not exist"),
        (["--model", "/nonexistent/model"], "error: model folder /nonexistent/model does not exist"),
    ],
)
def test_server_with_a_missing_adapter_or_model_folder_exits_2_with_one_line(args, message):
    from typer.testing import CliRunner

    from edge_server.cli import app

    result = CliRunner().invoke(app, ["serve", "--port", "0", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_a_worker_error_from_ray_is_reduced_to_its_message():
    from edge_server.service import actor_error_reason

    text = (
        "The actor died because of an error raised in its creation task, ray::EdgeWorker.__init__()\n"
        '  File "/x/sage_core/adapters.py", line 51, in resolve_adapter\n'
        "    raise ModelError(f'adapter folder {path} does not exist')\n"
        "sage_core.models.ModelError: adapter folder /nope does not exist\n"
    )
    assert actor_error_reason(RuntimeError(text)) == "adapter folder /nope does not exist"
    assert actor_error_reason(RuntimeError("the actor died\n  unexpectedly")) == "unexpectedly"
    from edge_server.engine import error_reason  # what a device is told of a failed window: the same line, named

    assert error_reason(RuntimeError(text)) == "sage_core.models.ModelError: adapter folder /nope does not exist"
    assert error_reason(RuntimeError("the actor died\n  unexpectedly")) == "RuntimeError: the actor died"


def test_devices_and_server_apply_no_adapter_unless_asked():
    from device_client.config import DeviceConfig
    from edge_server.config import ServerConfig
    from sage_core.adapters import ADAPTER_NONE, DEFAULT_ADAPTER_CHOICE

    assert DEFAULT_ADAPTER_CHOICE == ADAPTER_NONE  # measured: the shipped adapter lowers fidelity on this model
    assert ServerConfig().adapter == DeviceConfig(server="127.0.0.1:1").adapter == DEFAULT_ADAPTER_CHOICE
