"""The local CLI: outputs, the report's saving, and clear one-line errors on bad input with nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sage_core.generate import saving_closed_form
from sage_core.outputs import read_metadata


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from sage_core.models import tiny_pipeline

    path = tmp_path_factory.mktemp("model") / "tiny"
    tiny_pipeline(seed=0).save_pretrained(path, safe_serialization=True)
    return path


def run_cli_in(cwd: Path | None, cli: str, *args: str) -> subprocess.CompletedProcess:
    """Run the CLI whose typer app is `cli` ("sage_core.cli:main"), from `cwd` (None: this one)."""
    root = str(Path(__file__).resolve().parents[1])
    module, app = cli.split(":")
    return subprocess.run([sys.executable, "-c", f"from {module} import {app}; {app}()", *args],
                          capture_output=True, text=True, timeout=300, cwd=cwd, env={**os.environ, "PYTHONPATH": root})


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`sage-edge` with these arguments."""
    return run_cli_in(None, "sage_core.cli:main", *args)


def write_prompts(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_generate_writes_images_grids_and_report(tmp_path, tiny_model_dir):
    prompts = write_prompts(tmp_path, "a red circle\na red circle\na blue square on the left\n")
    out = tmp_path / "out"
    # tau -1 puts every prompt in one group (all pairs qualify), so the saving is beta * (1 - 1/3).
    res = run_cli("generate", "--prompts", str(prompts), "--out", str(out), "--model", str(tiny_model_dir),
                  "--steps", "5", "--share", "0.4", "--tau", "-1")
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    assert [g["members"] for g in report["groups"]] == [[0, 1, 2]]
    group = report["groups"][0]
    assert group["unet_evaluations"] == 2 * (2 + 3 * 3)
    assert group["saving"] == pytest.approx(saving_closed_form(2, 5, 3), abs=1e-12)
    assert report["totals"]["saving"] == pytest.approx(group["saving"])
    assert report["settings"] == {"steps": 5, "share": 0.4, "shared_steps": 2, "guidance": 7.5, "scheduler": "ddim",
                                  "shared_condition": "medoid", "negative_prompt": "", "tau": -1.0, "max_group": 5,
                                  "seed": 0}
    for i, prompt in enumerate(["a red circle", "a red circle", "a blue square on the left"]):
        with Image.open(out / f"images/{i:04d}.png") as img:
            assert img.size == (32, 32)
        meta = read_metadata(out / f"images/{i:04d}.png")  # the reader of a device's images reads these too
        assert meta["prompt"] == prompt and meta["index"] == i and meta["group_id"] == 0 and meta["group_size"] == 3
        assert (meta["seed"], meta["branch_step"], meta["total_steps"]) == (group["seed"], 2, 5)
        assert meta["model_fingerprint"] == report["model_fingerprint"] != ""
    assert (out / "groups/group_000.png").is_file()


@pytest.mark.parametrize(
    "text, args, message",
    [
        ("", [], "holds no prompts"),
        ("# only a comment\n\n", [], "holds no prompts"),
        ("a cat\n" + "x" * 1001 + "\n", [], "prompts.txt:2: the prompt is 1001 characters long"),
        ("a cat\n", ["--share", "1.5"], "share"),
        ("a cat\n", ["--share", "-0.1"], "share"),
        ("a cat\n", ["--steps", "0"], "steps"),
        ("a cat\n", ["--model", "/nonexistent/model"], "does not exist"),
        ("a cat\n", ["--tau", "2"], "tau"),
        ("a cat\n", ["--seed", "-1"], "--seed"),
        ("a cat\na dog\n", ["--seed", str(2**63 - 1)], "seed must be in [0, 2^63 - 1 - (prompts - 1)]"),
        ("a cat\n", ["--negative-prompt", "x" * 1001], "the negative prompt is 1001 characters long"),
        ("a cat\n", ["--negative-prompt", "bad\udcff"], "the negative prompt is not valid UTF-8 text (byte 3 onwards)"),
    ],
)
def test_bad_input_is_one_line_error(tmp_path, tiny_model_dir, text, args, message):
    prompts = write_prompts(tmp_path, text)
    out = tmp_path / "out"
    base = ["generate", "--prompts", str(prompts), "--out", str(out)]
    if "--model" not in args:
        base += ["--model", str(tiny_model_dir)]
    res = run_cli(*base, *args)
    assert res.returncode != 0
    assert message in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()
    assert not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize(
    "name, message",
    [("none.txt", "does not exist"), (".", "is a folder"), ("[red] none.txt", "[red] none.txt does not exist")],
)
def test_missing_prompt_file(tmp_path, tiny_model_dir, name, message):
    res = run_cli("generate", "--prompts", str(tmp_path / name), "--out", str(tmp_path / "o"),
                  "--model", str(tiny_model_dir))
    assert res.returncode != 0 and message in res.stderr and "Traceback" not in res.stderr


def test_prompt_file_reading(tmp_path):
    from sage_core.generate import read_prompt_file

    path = tmp_path / "p.txt"
    path.write_bytes("\ufeff# a comment\r\n  a red circle  \r\n\r\na blue square\r\n\n".encode())
    assert read_prompt_file(path) == ["a red circle", "a blue square"]  # no byte-order mark in the first prompt
    path.write_bytes(b"a red \xff circle\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_prompt_file(path)


def test_pickle_only_model_is_refused(tmp_path, tiny_model_dir):
    import shutil

    bad = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, bad)
    weights = bad / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(bad / "unet" / "diffusion_pytorch_model.bin")
    prompts = write_prompts(tmp_path, "a cat\n")
    res = run_cli("generate", "--prompts", str(prompts), "--out", str(tmp_path / "o"), "--model", str(bad))
    assert res.returncode != 0 and "safetensors only" in res.stderr and "Traceback" not in res.stderr


def test_output_under_a_file_is_refused(tmp_path, tiny_model_dir):
    prompts = write_prompts(tmp_path, "a cat\n")
    (tmp_path / "parent").write_text("mine")
    res = run_cli("generate", "--prompts", str(prompts), "--out", str(tmp_path / "parent" / "sub" / "out"),
                  "--model", str(tiny_model_dir))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "parent is a file, not a folder" in res.stderr and (tmp_path / "parent").read_text() == "mine"


def test_existing_output_is_not_overwritten(tmp_path, tiny_model_dir):
    prompts = write_prompts(tmp_path, "a cat\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = run_cli("generate", "--prompts", str(prompts), "--out", str(out), "--model", str(tiny_model_dir))
    assert res.returncode != 0 and "--overwrite" in res.stderr
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("cli, command", [("sage_core.cli:main", "generate"), ("device_client.cli:main", "demo")])
@pytest.mark.parametrize("out", [".", ".."])
def test_overwrite_never_deletes_the_current_folder(tmp_path, tiny_model_dir, out, cli, command):
    here = tmp_path / "work"
    here.mkdir()
    write_prompts(here, "a cat\n")
    (here / "report.json").write_text("{}")  # looks like a run's output: still not to be deleted
    res = run_cli_in(here, cli, command, "--prompts", "prompts.txt", "--out", out, "--overwrite",
                     "--model", str(tiny_model_dir), "--steps", "2")
    assert res.returncode != 0 and "current folder" in res.stderr and "Traceback" not in res.stderr
    assert sorted(p.name for p in here.iterdir()) == ["prompts.txt", "report.json"]


@pytest.mark.parametrize("layout, message", [
    ("file", "is a file"),
    ("foreign", "not a previous run's output"),
    ("input inside", "holds this run's input"),
])
def test_overwrite_replaces_only_a_previous_runs_output(tmp_path, tiny_model_dir, layout, message):
    out = tmp_path / "out"
    if layout == "file":
        out.write_text("mine")
        prompts = write_prompts(tmp_path, "a cat\n")
    else:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        if layout == "input inside":
            (out / "report.json").write_text("{}")
        prompts = write_prompts(out if layout == "input inside" else tmp_path, "a cat\n")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    res = run_cli("generate", "--prompts", str(prompts), "--out", str(out), "--overwrite",
                  "--model", str(tiny_model_dir), "--steps", "2")
    assert res.returncode != 0 and message in res.stderr and "Traceback" not in res.stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_device_overwrite_replaces_only_an_image_a_run_wrote(tmp_path):
    """`sage-device generate -o photo.png --overwrite` replaced any file (a photo of the user's own included), where
    every other --overwrite replaces only what a run wrote: now only a PNG carrying SAGE metadata, and the refusal
    is exit 2 before the server is asked (it used to connect, here to fail with exit 1)."""
    from typer.testing import CliRunner

    from device_client.cli import check_png_out, main
    from sage_core.outputs import save_png

    photo = tmp_path / "photo.png"
    Image.new("RGB", (4, 4), "red").save(photo)
    before = photo.read_bytes()
    args = ["generate", "a cat", "-o", str(photo), "--overwrite", "--server", "127.0.0.1:1", "--model", "tiny",
            "--adapter", "none", "--connect-timeout", "0.5"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert f"error: {photo} is not an image a SAGE run wrote" in res.output and photo.read_bytes() == before
    ours = save_png(Image.new("RGB", (4, 4)), tmp_path / "ours.png", {"prompt": "a cat"})
    check_png_out(ours, overwrite=True)  # a previous run's image: replaced
    with pytest.raises(ValueError, match="ours.png exists; pass --overwrite to replace it$"):
        check_png_out(ours, overwrite=False)


def test_output_checks_say_the_same_thing_for_the_same_mistake(tmp_path):
    """A file where a folder goes, or the reverse, and an existing output without --overwrite: one wording for
    every command's folders and files (sage_core.outputs), where sage-sim, the device and the benchmarks each had
    their own."""
    from sage_core.outputs import OutputDirError, check_output_dir, check_output_file, check_work_dir

    file, folder = tmp_path / "f.json", tmp_path / "d"
    file.write_text("{}")
    folder.mkdir()
    (folder / "x").write_text("")
    cases = [(lambda: check_output_dir(file), f"{file} is a file; give a folder for the output"),
             (lambda: check_output_file(folder), f"{folder} is a folder; give a file to write"),
             (lambda: check_output_file(f"{tmp_path}/new/"), f"{tmp_path}/new/ is a folder; give a file to write"),
             (lambda: check_output_dir(folder), f"{folder} exists and is not empty; pass --overwrite to replace it"),
             (lambda: check_output_file(file), f"{file} exists; pass --overwrite to replace it"),
             (lambda: check_output_file(file, True, "a workload file", lambda p: False),
              f"{file} is not a workload file; --overwrite replaces only such a file, so nothing was deleted"),
             (lambda: check_output_file(file / "x.json", True), f"{file / 'x.json'} cannot be made: {file} is a file"),
             (lambda: check_work_dir(file), f"{file} is a file; give a folder for the output"),
             (lambda: check_work_dir(Path("/proc/x")), "/proc/x cannot be made: cannot write in /proc")]
    for check, message in cases:
        with pytest.raises(OutputDirError) as info:
            check()
        assert str(info.value).startswith(message)
    assert check_output_file(str(file), overwrite=True) == file
    check_work_dir(folder)  # sage-train's folders are kept across runs: a non-empty one needs no --overwrite


def test_a_failed_png_save_leaves_the_previous_image_and_no_part(tmp_path, monkeypatch):
    """save_png wrote straight into the file: a save failing midway left half an image, which the device's
    --overwrite then refused to replace (no SAGE metadata). It now writes the sibling `.part` and renames it."""
    from sage_core.outputs import is_sage_png, save_png

    path = save_png(Image.new("RGB", (4, 4)), tmp_path / "out.png", {"prompt": "a cat"})
    before = path.read_bytes()

    def half_save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(before[:20])
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", half_save)
    with pytest.raises(OSError, match="No space left"):
        save_png(Image.new("RGB", (4, 4)), path, {"prompt": "a dog"})
    assert path.read_bytes() == before and is_sage_png(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_overwrite_replaces_a_previous_run(tmp_path, tiny_model_dir):
    prompts = write_prompts(tmp_path, "a cat\n")
    out = tmp_path / "out"
    args = ("generate", "--prompts", str(prompts), "--out", str(out), "--model", str(tiny_model_dir), "--steps", "2")
    assert run_cli(*args).returncode == 0
    (out / "images" / "0000.png").write_bytes(b"stale")
    res = run_cli(*args, "--overwrite")
    assert res.returncode == 0, res.stderr
    assert Image.open(out / "images" / "0000.png").size == (32, 32)


def test_a_negative_prompt_is_recorded_and_noted_where_it_does_nothing(tmp_path, tiny_model_dir):
    """--negative-prompt reaches the report and every image's metadata; with guidance 1 (no classifier-free
    guidance) a note says it has no effect."""
    prompts = write_prompts(tmp_path, "a cat\na dog\n")
    for guidance, noted in (("7.5", False), ("1", True)):
        out = tmp_path / f"out{guidance}"
        res = run_cli("generate", "--prompts", str(prompts), "--out", str(out), "--model", str(tiny_model_dir),
                      "--steps", "2", "--guidance", guidance, "--negative-prompt", "blurry, [red]text")
        assert res.returncode == 0, res.stderr
        assert ("the negative prompt has no effect" in res.stderr) == noted, res.stderr
        report = json.loads((out / "report.json").read_text())
        assert report["settings"]["negative_prompt"] == "blurry, [red]text"
        assert read_metadata(out / "images/0001.png")["negative_prompt"] == "blurry, [red]text"


def test_overlong_prompt_is_noted_in_the_output_and_report(tmp_path, tiny_model_dir):
    from sage_core.generate import overlong_prompts
    from sage_core.models import build_clip_tokenizer

    long = " ".join(["a red circle on the left of a blue square"] * 12)  # 12 x 10 words: over 77 tokens
    ignored = overlong_prompts(build_clip_tokenizer(), ["a cat", long])
    assert list(ignored) == [1] and ignored[1] > 0
    prompts = write_prompts(tmp_path, f"a cat\n{long}\n")
    out = tmp_path / "out"
    res = run_cli("generate", "--prompts", str(prompts), "--out", str(out), "--model", str(tiny_model_dir),
                  "--steps", "2", "--negative-prompt", f"{long} blurry")  # one token more than the long prompt
    assert res.returncode == 0, res.stderr
    assert "prompt 2 is too long" in res.stderr and f"ignores the last {ignored[1]}" in res.stderr
    assert f"the negative prompt is too long: the text encoder reads its first 77 tokens and ignores the last " \
           f"{ignored[1] + 1}" in res.stderr
    assert "indexing errors" not in res.stderr  # the tokenizer's own, misleading warning stays quiet
    report = json.loads((out / "report.json").read_text())
    entries = report["prompts"]
    assert "ignored_tokens" not in entries[0] and entries[1]["ignored_tokens"] == ignored[1]
    assert report["settings"]["negative_prompt_ignored_tokens"] == ignored[1] + 1
    assert read_metadata(out / "images/0000.png")["negative_prompt_ignored_tokens"] == ignored[1] + 1


# ---------------------------------------------------------------------------------------------------- sage-train
def run_train(*args: str):
    """`sage-train` in this process (typer's runner)."""
    from typer.testing import CliRunner

    from training.cli import app

    return CliRunner().invoke(app, list(args))


def assert_one_line_error(result, message: str) -> None:
    """Exit code 2, one `error: ...` line containing `message`, no traceback."""
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output, result.output
    assert result.output.strip().startswith("error: ") and result.output.strip().count("\n") == 0, result.output


@pytest.fixture(scope="module")
def grouped_dataset(tmp_path_factory) -> Path:
    from training.grouped_dataset import GroupedDataset, save_grouped_dataset, world_items

    path = tmp_path_factory.mktemp("ds") / "groups.json"
    return save_grouped_dataset(GroupedDataset(world_items(6, 0, "train"), [[0, 1, 2], [3, 4, 5]], {}), path)


NO_GPU = pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message of a GPU-less machine")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["finetune", "--out-dir", "{file}"], "{file} is a file; give a folder for the output"),
        (["finetune", "--out-dir", "/proc/nope"], "/proc/nope cannot be made: cannot write in /proc"),
        (["finetune", "--device", "gpu"], "unknown device 'gpu'; use cpu, cuda or cuda:N"),
        pytest.param(["finetune", "--device", "cuda"], "no CUDA GPU is available", marks=NO_GPU),
        (["finetune", "--dataset", "{dir}"], "grouped dataset {dir} is a folder"),
        (["judges", "--only", "bogus"], "only must name oracle and/or clip, got ['bogus']"),
        pytest.param(["judges", "--device", "cuda"], "no CUDA GPU is available", marks=NO_GPU),
        (["groups", "--out", "/proc/x.json"], "/proc/x.json cannot be made: cannot write in /proc"),
        (["groups", "--n", "0"], "--n must be >= 2"),
        (["evaluate-default", "--out", "{file}"], "{file} is a file; give a folder for the output"),
        (["judges", "--out", "{file}"], "{file} is a file; give a folder for the output"),
        (["evaluate-default", "--batch-size", "0"], "batch_size must be >= 1, got 0"),
        pytest.param(["evaluate-default", "--device", "cuda"], "no CUDA GPU is available", marks=NO_GPU),
        (["default-model", "--device", "gpu"], "unknown device 'gpu'"),
        (["default-model", "--device", "cpu", "--output-dir", "{file}"], "{file} is a file; give a folder for the"),
    ],
)
def test_sage_train_bad_input_is_one_line_error_before_any_work(tmp_path, grouped_dataset, monkeypatch, args,
                                                                message):
    import training.default_model as dm
    import training.grouped_dataset as gd
    from sage_core import models

    def no_work(*_a, **_k):
        raise AssertionError("the command started working before checking its input")

    monkeypatch.setattr(models, "load_pipeline", no_work)
    monkeypatch.setattr(gd, "make_embedder", no_work)
    monkeypatch.setattr(dm, "render_training_data", no_work)
    afile = tmp_path / "afile"
    afile.write_text("x")
    fill = {"{file}": str(afile), "{dir}": str(tmp_path)}
    args = [fill.get(a, a) for a in args]
    for key, value in fill.items():
        message = message.replace(key, value)
    if args[0] == "finetune" and "--dataset" not in args:
        args += ["--dataset", str(grouped_dataset)]
    if args[0] == "default-model":
        args += ["--work-dir", str(tmp_path / "work")]
    assert_one_line_error(run_train(*args), message)


def test_default_model_resume_with_other_settings_is_refused_and_config_kept(tmp_path):
    from test_default_model import TINY

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY | {"work_dir": str(tmp_path / "work"), "output_dir": str(tmp_path / "out")}))
    assert run_train("default-model", "--config", str(config)).exit_code == 0
    recorded = (tmp_path / "work" / "config.json").read_text()
    cases = [
        (["--set", "seed=3"], "seed: 0 -> 3"),
        (["--set", "diffusion.lr=0.001", "--set", "diffusion.ema_decay=0.9"],
         "diffusion.ema_decay: 0.999 -> 0.9; diffusion.lr: 0.0005 -> 0.001"),
        (["--stages", "unet", "--set", "unet.block_out_channels=[16, 16]"], "unet.block_out_channels: [16, 32] -> "),
        (["--stages", "vae", "--set", "vae.lr=0.01"], "vae.lr: 0.001 -> 0.01"),
    ]
    for extra, message in cases:
        result = run_train("default-model", "--config", str(config), *extra)
        assert_one_line_error(result, message)
        assert "was made with other settings" in result.output
        assert (tmp_path / "work" / "config.json").read_text() == recorded
    result = run_train("default-model", "--config", str(config), "--stages", "unet", "--set", "diffusion.steps=3")
    assert result.exit_code == 0, result.output  # more steps: allowed, and said
    assert "resuming with another step count (diffusion.steps: 2 -> 3)" in result.output
