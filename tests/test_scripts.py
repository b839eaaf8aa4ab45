"""The command-line entry points, run as a user runs them."""

import importlib
import json
import runpy
import subprocess
import sys
from unittest import mock

import pytest

from .conftest import REPO


def console_scripts() -> dict[str, str]:
    """setup.py's console scripts, {command: "module:function"}, read by running setup.py with
    setuptools.setup replaced (nothing is installed)."""
    arguments = {}
    with mock.patch("setuptools.setup", lambda **kwargs: arguments.update(kwargs)):
        runpy.run_path(str(REPO / "setup.py"))
    return dict(line.replace(" ", "").split("=") for line in arguments["entry_points"]["console_scripts"])


def test_console_scripts_name_the_command_line_programs():
    scripts = console_scripts()
    assert set(scripts) >= {"mft-train", "mft-chat", "mft-prepare-data", "mft-merge", "mft-convert-gguf"}
    for command, target in scripts.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), command
        # The same program in a checkout that is not installed.
        wrapper = REPO / "scripts" / f"{module.rsplit('.', 1)[-1]}.py"
        assert f"from {module} import {function}" in wrapper.read_text(), wrapper


@pytest.mark.parametrize("command,expected", [
    ("mft-train", "--weighted_loss_mode"),
    ("mft-prepare-data", "--show_samples"),
    ("mft-merge", "--adapter"),
    ("mft-chat", "--model"),
    ("mft-convert-gguf", "--from_package"),
])
def test_each_entry_point_prints_its_help(command, expected, capsys):
    module, function = console_scripts()[command].split(":")
    main = getattr(importlib.import_module(module), function)
    try:
        status = main(["--help"])
    except SystemExit as exit_:  # argparse's --help
        status = exit_.code
    assert status == 0
    assert expected in capsys.readouterr().out


def test_prepare_data_prints_summary_samples_and_saves(tmp_path):
    result = subprocess.run(
        [sys.executable, "scripts/prepare_data.py", "examples/recipes/demo_data.yaml", "--show_samples", "1",
         "--save_to", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={"HF_DATASETS_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Multi-task dataset: 4 tasks" in out
    for task in ("code_generation", "code_qa", "multi_round_chat", "code_completion"):
        assert f"--- {task} (" in out
    assert "«" in out and "<|endoftext|>»" in out  # trained spans end with EOS
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["total"]["samples"] == 100
    assert json.loads((tmp_path / "out" / "tasks.json").read_text())["tasks"][0]["name"] == "code_generation"


def test_prepare_data_shows_samples_of_packed_rows(tmp_path):
    recipe = tmp_path / "packed.yaml"
    recipe.write_text((REPO / "examples/recipes/demo_data.yaml").read_text() + "padding_mode: pack\n")
    result = subprocess.run(
        [sys.executable, "scripts/prepare_data.py", str(recipe), "--show_samples", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={"HF_DATASETS_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    assert "padding_mode pack:" in result.stdout and "efficiency" in result.stdout
    for task in ("code_generation", "code_qa", "multi_round_chat", "code_completion"):
        assert result.stdout.count(f"--- {task} (") == 1  # one sample per task, cut out of the packed rows
