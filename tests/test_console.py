"""What every command shares (pipeline/console.py): the offline default of each command, one-line user errors, and
JSON output of numpy values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.console import emit, human_bytes, user_errors
from pipeline.errors import EncoderError

ROOT = Path(__file__).resolve().parents[1]
COMMAND_MODULES = ("pipeline.cli", "train.cli", "train.ablate_cli", "train.search_cli")
SHOW_ENVIRONMENT = ("import importlib, json, os, sys; importlib.import_module(sys.argv[1]); "
                    "print(json.dumps([os.environ.get('HF_HUB_OFFLINE'), os.environ.get('TOKENIZERS_PARALLELISM'), "
                    "'huggingface_hub' in sys.modules]))")


def environment_after_import(module: str, **env: str) -> list:
    base = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")}
    proc = subprocess.run([sys.executable, "-c", SHOW_ENVIRONMENT, module], capture_output=True, text=True,
                          cwd=ROOT, env={**base, **env}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("module", COMMAND_MODULES)
def test_every_command_module_turns_the_hub_off_before_any_hub_code_is_imported(module):
    assert environment_after_import(module) == ["1", "false", False]


def test_a_hub_setting_the_user_chose_is_kept():
    assert environment_after_import("train.cli", HF_HUB_OFFLINE="0", TOKENIZERS_PARALLELISM="true")[:2] == [
        "0", "true"]


def test_user_errors_print_the_first_line_of_a_user_mistake_and_exit_1():
    @click.command()
    @click.argument("what")
    @user_errors
    def command(what):
        if what == "spec":
            raise EncoderError("unknown encoder spec 'x'\nsecond line")
        raise FileNotFoundError(2, "No such file or directory", "/no/such/file")

    runner = CliRunner()
    spec = runner.invoke(command, ["spec"])
    assert (spec.exit_code, spec.output) == (1, "Error: unknown encoder spec 'x'\n")
    missing = runner.invoke(command, ["file"])
    assert (missing.exit_code, missing.output) == (1, "Error: /no/such/file: No such file or directory\n")


def test_emit_writes_numpy_values_and_paths_as_plain_json(capsys):
    emit({"n": np.int64(3), "x": np.float32(0.5), "v": np.arange(2), "p": Path("/a/b")}, True, "unused")
    assert json.loads(capsys.readouterr().out) == {"n": 3, "x": 0.5, "v": [0, 1], "p": "/a/b"}
    emit({"n": 1}, False, "three rows")
    assert capsys.readouterr().out == "three rows\n"
    assert [human_bytes(n) for n in (512, 2048, 3 * 1024 ** 3)] == ["512 B", "2.0 KiB", "3.0 GiB"]
