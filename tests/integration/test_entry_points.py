"""The runtime entry points a cluster starts take typed options: bad ones get one line and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("grpc")
pytest.importorskip("onnxruntime")

from rocoin.runtime.api.options import SourceOptions  # noqa: E402
from rocoin.runtime.device.options import DeviceOptions  # noqa: E402


@pytest.mark.parametrize(
    ("module", "options", "expected"),
    [
        ("rocoin.runtime.device", {"bundle": "b", "device_id": "a", "listen_port": 1}, "listen_port"),
        ("rocoin.runtime.device", {"bundle": "b"}, "device_id"),
        ("rocoin.runtime.api", {"bundle": "b", "fleet": "f", "deadline_s": "soon"}, "deadline_s"),
    ],
)
def test_bad_options_get_one_line_and_exit_2(tmp_path, module, options, expected):
    path = tmp_path / "options.json"
    path.write_text(json.dumps(options))
    run = subprocess.run([sys.executable, "-m", module, "--options", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], run.stderr


def test_a_missing_bundle_is_bad_input_not_a_crash(tmp_path):
    path = tmp_path / "options.json"
    path.write_text(DeviceOptions(bundle=tmp_path / "nothing", device_id="a", insecure=True).model_dump_json())
    run = subprocess.run(
        [sys.executable, "-m", "rocoin.runtime.device", "--options", str(path)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr and str(tmp_path / "nothing") in run.stderr


def test_the_command_line_shows_the_options_defaults():
    from typer.testing import CliRunner

    from rocoin.cli.main import app

    device_help = CliRunner().invoke(app, ["device", "serve", "--help"], env={"COLUMNS": "200"}).output
    source_help = CliRunner().invoke(app, ["source", "serve", "--help"], env={"COLUMNS": "200"}).output
    assert f"[default: {DeviceOptions.model_fields['listen'].default}]" in device_help
    assert f"[default: {SourceOptions.model_fields['deadline_s'].default}]" in source_help
