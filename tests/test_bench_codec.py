"""The codec benchmark's command line: --quick's small sizes give way to the options given, and settings it cannot
run are refused with one line (its figures are checked by tests/test_codec.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.bench_codec import main, parse_args


def test_quick_only_changes_the_defaults():
    args = parse_args(["--quick", "--repeats", "1", "--steps", "6", "--betas", "0.2", "0.3"])
    assert (args.repeats, args.steps, args.betas) == (1, 6, [0.2, 0.3])  # used to be 2, 4 and [0.2]
    assert (args.size, args.seeds, args.prompts) == (16, 1, 2)
    assert parse_args([]).size == 64 and parse_args(["--quick"]).betas == [0.4]


@pytest.mark.parametrize("argv", [["--group-size", "0"], ["--repeats", "0"], ["--level", "99"], ["--betas", "1.5"],
                                  ["--image-size", "4"]])
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
