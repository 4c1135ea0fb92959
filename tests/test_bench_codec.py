"""The codec benchmark's command line: --quick's small sizes give way to the options given, and settings it cannot
run are refused with one line (its figures are checked by tests/test_codec.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.bench_codec import main, parse_args


def test_quick_only_changes_the_defaults():
    args = parse_args(["--quick", "--repeats", "1", "--steps", "6", "--betas", "0.2", "0.3"])
    assert (args.repeats, args.steps, args.betas) == (1, 6, [0.2, 0.3])  # used to be 2, 4 and [0.2]
    assert (args.size, args.seeds, args.prompts) == (64, 1, 2)  # the latents keep the size the budget is about
    assert parse_args([]).size == 64 and parse_args(["--quick"]).betas == [0.4]


@pytest.mark.parametrize("argv", [["--group-size", "0"], ["--repeats", "0"], ["--level", "99"], ["--betas", "1.5"],
                                  ["--image-size", "4"], ["--modes", "int4", "int4"], ["--betas", "0.2", "0.2"]])
def test_settings_it_cannot_run_are_refused_with_one_line(argv, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert "error:" in capsys.readouterr().err


def test_a_missing_model_folder_is_one_line_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--modes", "fp16", "--model", str(tmp_path / "none")])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and err.strip().endswith(f"error: --model: model folder {tmp_path / 'none'} "
                                                                "does not exist")
    assert out == ""  # part 1 used to run (and print its table) before the model folder was looked at


def test_no_tiny_fallback_without_the_default_model_is_one_line_exit_2_before_any_work(tmp_path, monkeypatch, capsys):
    """--no-tiny-fallback with no shipped default model ran part 1, then ended with exit status 1: a missing input
    is exit 2, found before any work, as for a missing --model folder."""
    import sage_core.models

    monkeypatch.setattr(sage_core.models, "DEFAULT_MODEL_DIR", tmp_path / "none")
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--modes", "fp16", "--no-tiny-fallback"])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == ""
    assert err.strip().endswith(f"error: --no-tiny-fallback: the shipped default model: model folder "
                                f"{tmp_path / 'none'} does not exist")


def test_tiny_model_runs_the_image_part(capsys):
    """--model tiny, as every other command takes it, used to be 'error: model folder tiny does not exist'."""
    result = main(["--quick", "--modes", "int8", "--model", "tiny"])
    assert result["model"] == "tiny random pipeline" and [r["mode"] for r in result["model_latents"]] == ["int8"]


def test_json_results_make_their_folder(tmp_path):
    """A benchmark's figures are not lost at the end of its run to a --json folder that does not exist yet."""
    import json

    from benchmarks.results import write_json

    path = tmp_path / "new" / "deeper" / "result.json"
    assert write_json({"ms": 2.07, "where": Path("x")}, str(path)) == {"ms": 2.07, "where": Path("x")}
    assert json.loads(path.read_text()) == {"ms": 2.07, "where": "x"}


def test_quick_judges_the_byte_budget_on_sd15_size_latents(capsys):
    """--quick judged the 8 KiB budget (a quarter of a raw fp16 4x64x64 latent) on 4x16x16 latents, on which every
    mode fits: it reported fp32 (60 KB at 4x64x64) within the budget."""
    result = main(["--quick", "--no-images", "--repeats", "1", "--modes", "fp32", "int4"])
    assert result["modes_within_budget"] == ["int4"]
    assert {tuple(r["shape"]) for r in result["latents"]} == {(1, 4, 64, 64)}
    out = capsys.readouterr().out
    assert "within 8192 B on every synthetic 1x4x64x64 latent: int4" in out and "synthetic 1x4x64x64," in out


def test_no_budget_verdict_on_latents_of_another_size(capsys):
    result = main(["--quick", "--no-images", "--repeats", "1", "--modes", "fp32", "--size", "16"])
    assert result["modes_within_budget"] is None
    out = capsys.readouterr().out
    assert "no verdict on the 8192 B budget: it is about 1x4x64x64 latents, these are 1x4x16x16" in out
    assert "| 1x4x16x16 | fp32 |" in out and " | - | " in out and "| yes |" not in out  # nor does the table
