"""`siftc train --config FILE`: JSON or YAML settings under the flags' names, a run's run.json among
them; command-line flags override the file; unknown keys and wrong types are one-line errors naming the
key and the file; YAML without PyYAML names the install."""
import json
import subprocess
import sys

import pytest

from test_train import ENV, cli, one_thread, work  # noqa: F401 (fixtures: the converted classifier, 1 thread)


def settings(work, run, **more) -> dict:
    return {"artifact": str(work / "clf"), "data": str(work / "data.npz"), "output": str(run), "method": "set",
            "steps": 6, "batch-size": 16, "update_every": 2, "lr": 0.002, "backend": "torch", "quiet": True,
            **more}


def config_of(run) -> dict:
    return json.loads((run / "run.json").read_text())["config"]


def test_every_run_setting_has_a_flag():
    """So every key of a run.json's config is a key a --config file takes."""
    from dataclasses import fields

    from siftc.cli.config_file import ALIASES
    from siftc.cli.train import train
    from siftc.train import TrainConfig
    flags = {p.name for p in train.params}
    assert {ALIASES.get(f.name, f.name) for f in fields(TrainConfig)} <= flags


def test_json_and_yaml_configs_train_and_flags_override(work, tmp_path):
    runs = {}
    for fmt in ("json", "yaml"):
        run, path = tmp_path / f"from-{fmt}", tmp_path / f"run.{fmt}"
        s = settings(work, run)
        if fmt == "json":
            path.write_text(json.dumps(s))
        else:
            path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in s.items()))
        r = cli("train", "--config", path, "--steps", 4, "--seed", 5)  # flags override the file
        assert r.exit_code == 0, r.output
        runs[fmt] = config_of(run)
    assert runs["json"] == {**runs["yaml"], "out": runs["json"]["out"]}
    cfg = runs["json"]
    assert (cfg["method"], cfg["batch_size"], cfg["update_every"], cfg["lr"]) == ("set", 16, 2, 0.002)  # file
    assert (cfg["steps"], cfg["seed"]) == (4, 5)  # command line


def test_a_runs_run_json_is_valid_input(work, tmp_path):
    first = tmp_path / "first"
    r = cli("train", work / "clf", "--data", work / "data.npz", "-o", first, "--method", "rigl", "--steps", 4,
            "--batch-size", 8, "--lr-schedule", "cosine", "--warmup-steps", 1, "--backend", "torch", "--quiet")
    assert r.exit_code == 0, r.output
    second = tmp_path / "second"
    r = cli("train", "--config", first / "run.json", "-o", second, "--quiet")
    assert r.exit_code == 0, r.output
    assert {**config_of(first), "out": str(second)} == config_of(second)
    r = cli("train", "--config", first / "run.json", "--quiet")  # its own out: exists
    assert r.exit_code == 2 and "already exists" in r.stderr, r.output


@pytest.mark.parametrize("fmt, text, needle", [
    ("json", '{"stepz": 3}', "run.json: unknown key 'stepz'; did you mean 'steps'? the keys are train's flags:"),
    ("json", '{"steps": "3"}', "run.json: steps is '3', expected an integer"),
    ("json", '{"steps": true}', "run.json: steps is True, expected an integer"),
    ("json", '{"method": "magnitude"}', "run.json: method is 'magnitude', expected one of static, set, rigl"),
    ("json", '{"quiet": 1}', "run.json: quiet is 1, expected true or false"),
    ("json", '{"lr": null}', "run.json: lr is null; give it a value or leave the key out"),
    ("json", '{"resume": "runs/a"}', "run.json: unknown key 'resume'"),
    ("json", '[1, 2]', "run.json holds list, not a mapping of settings"),
    ("json", '{"steps": 3,', "run.json is not valid JSON (line 1:"),
    ("yaml", "lr: 3e-3\n", "run.yaml: lr is '3e-3', expected a number (YAML 1.1 reads 3e-3 as a string: write 3.0e-3)"),
    ("yaml", "steps: [3\n", "run.yaml is not valid YAML (line 2:"),
    ("toml", "steps = 3\n", "expected a .json, .yaml or .yml file"),
])
def test_bad_config_files_are_one_line_errors(work, tmp_path, fmt, text, needle):
    path = tmp_path / f"run.{fmt}"
    path.write_text(text)
    r = cli("train", work / "clf", "--data", work / "data.npz", "-o", tmp_path / "r", "--config", path)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
    assert str(path) in r.stderr and not (tmp_path / "r").exists()


def test_config_with_resume_is_refused(work, tmp_path):
    path = tmp_path / "run.json"
    path.write_text("{}")
    r = cli("train", "--resume", tmp_path / "any", "--config", path)
    assert r.exit_code == 2 and "drop config" in r.stderr, r.output


def test_yaml_without_pyyaml_names_the_install(work, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 2\n")
    blocked = "import sys; sys.modules['yaml'] = None; from siftc.cli import main; sys.exit(main())"
    r = subprocess.run([sys.executable, "-c", blocked, "train", "--config", str(path)], env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr == (f"siftc: error: reading {path} needs PyYAML, which is not installed here: pip install "
                        f"pyyaml (or write the settings as .json)\n")
