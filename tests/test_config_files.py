"""sage_core.config_files: one reader for every CLI's config file, each problem one line naming the file."""

from __future__ import annotations

import pytest

from sage_core.config_files import ConfigFileError, read_config_file, read_mapping


@pytest.mark.parametrize(
    ("name", "text"),
    [("a.yaml", "steps: 4\nname: x\n"), ("a.yml", "steps: 4\nname: x\n"), ("a.json", '{"steps": 4, "name": "x"}'),
     ("a.toml", 'steps = 4\nname = "x"\n')],
)
def test_each_format_by_suffix(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    assert read_mapping(tmp_path / name) == {"steps": 4, "name": "x"}


@pytest.mark.parametrize("name", ["empty.yaml", "empty.json", "empty.toml"])
def test_an_empty_file_is_no_settings(tmp_path, name):
    (tmp_path / name).write_text("\n")
    assert read_config_file(tmp_path / name) is None
    assert read_mapping(tmp_path / name) == {}


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.yaml", b"a: [1, 2\nb: 3\n", r"bad.yaml is not valid YAML: line 2, column 2: expected ','"),
        ("bad.json", b'{"a": 1,}', r"bad.json is not valid JSON: Expecting property name"),
        ("bad.toml", b"a = \n", r"bad.toml is not valid TOML: Invalid value \(at line 1, column 5\)"),
        ("bin.yaml", b"\xff\xfe\x00", r"cannot read config file .*bin.yaml: 'utf-8' codec can't decode"),
        ("list.yaml", b"- 1\n- 2\n", r"list.yaml must hold a mapping of settings, not a list"),
    ],
)
def test_problems_are_one_line_naming_the_file(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ConfigFileError, match=message) as err:
        read_mapping(tmp_path / name)
    assert "\n" not in str(err.value)


def test_missing_files_folders_and_suffixes(tmp_path):
    with pytest.raises(ConfigFileError, match="config file .*none.yaml does not exist"):
        read_config_file(tmp_path / "none.yaml")
    with pytest.raises(ConfigFileError, match="is not a file"):
        read_config_file(tmp_path)
    (tmp_path / "a.json").write_text("{}")
    with pytest.raises(ConfigFileError, match=r"a.json must end in .yaml, .toml"):
        read_config_file(tmp_path / "a.json", suffixes=(".yaml", ".toml"))


def test_replicate_config_that_is_not_a_mapping_is_refused(tmp_path):
    """It was a TypeError traceback (a list | dict) before the shared reader."""
    from training.replicate import load_config

    (tmp_path / "r.yaml").write_text("- table\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config(tmp_path / "r.yaml")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("top.yaml", "grouping:\n  tau: 0.5\nseed: 1\ngrouping: {tau: 0.9}\n",
         r"top.yaml is not valid YAML: line 4, column 1: duplicate key 'grouping' \(first on line 1\)"),
        ("nested.yaml", "server:\n  window_s: 1\n  window_s: 2\n",
         r"line 3, column 3: duplicate key 'window_s' \(first on line 2\)"),
        ("dup.json", '{"seed": 1, "server": {"a": 1}, "server": {"b": 2}}', r"dup.json is not valid JSON: .*'server'"),
    ],
)
def test_a_key_given_twice_is_refused_naming_it(tmp_path, name, text, message):
    """safe_load and json.loads keep the last of two equal keys, silently dropping a whole section."""
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigFileError, match=message) as err:
        read_mapping(tmp_path / name)
    assert "\n" not in str(err.value)


def test_merge_keys_may_still_be_overridden(tmp_path):
    """`<<: *base` then a key of base is an override, not a duplicate."""
    (tmp_path / "m.yaml").write_text("base: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 3\n")
    assert read_mapping(tmp_path / "m.yaml")["c"] == {"x": 3, "y": 2}


def test_the_edge_servers_config_refuses_a_key_given_twice(tmp_path):
    """It reads through the same function: the second `server:` section replaced the first."""
    from edge_server.config import ConfigError, read_config_file

    (tmp_path / "s.yaml").write_text("server:\n  tau: 0.9\nserver:\n  num_workers: 2\n")
    with pytest.raises(ConfigError, match=r"line 3, column 1: duplicate key 'server' \(first on line 1\)"):
        read_config_file(tmp_path / "s.yaml")


HUGE = "1" + "0" * 400  # an integer to YAML, beyond a float's range


def _load(kind: str, path):
    """The config loader of one process: the edge server, the simulator or training's finetune."""
    from edge_server.config import build_config
    from simulation.config import load_config as load_sim_config
    from training.finetune import load_config as load_finetune_config

    return {"edge": build_config, "sim": load_sim_config, "finetune": load_finetune_config}[kind](path)


@pytest.mark.parametrize(
    ("kind", "text", "message"),
    [
        ("edge", f"max_wait_ms: {HUGE}", r"^max_wait_ms must be a finite number, got an integer of 401 digits$"),
        ("edge", f"adaptive_taus: [0.5, {HUGE}]", r"^adaptive_taus\[1\] must be a finite number, got an integer of 4"),
        ("edge", "depth_schedule: [[0.9, 0.4, 1.0]]", r"^depth_schedule\[0\] must be a list of 2 values"),
        ("edge", "unet_buckets: [4, x]", r"^unet_buckets\[1\] must be an integer, got 'x'$"),
        ("sim", f"arrivals: {{rate: {HUGE}}}", r"^arrivals.rate must be a finite number, got an integer of 401 digit"),
        ("finetune", f"lr: {HUGE}", r"^lr must be a finite number, got an integer of 401 digits$"),
    ],
)
def test_bad_numbers_are_one_line_errors_naming_the_item(tmp_path, kind, text, message):
    """An integer beyond a float's range was an OverflowError traceback in every process (float() of it
    overflows); the edge server read its lists by hand first, so a bad item was 'adaptive_taus: cannot read [...]
    (...)', the item unnamed, or that traceback."""
    (tmp_path / "c.yaml").write_text(text + "\n")
    with pytest.raises(ValueError, match=message) as err:
        _load(kind, tmp_path / "c.yaml")
    assert "\n" not in str(err.value)
