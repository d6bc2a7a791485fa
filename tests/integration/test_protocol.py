"""The generated protocol modules are fresh, importable and import themselves absolutely."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gen_proto.py"
PROTOCOL = ROOT / "src" / "rocoin" / "runtime" / "transport" / "protocol"

pytest.importorskip("grpc_tools", reason="grpcio-tools is needed to regenerate the protocol modules")


def _load_script():
    spec = importlib.util.spec_from_file_location("gen_proto", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_protocol_modules_are_fresh():
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"stale generated code; run `python scripts/gen_proto.py`\n{result.stderr}"


def test_the_check_notices_a_changed_proto(tmp_path, capsys):
    gen_proto = _load_script()
    copy = tmp_path / "src" / "rocoin" / "runtime" / "transport" / "protocol"
    shutil.copytree(PROTOCOL, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert gen_proto.check(tmp_path / "src") == 0
    proto = copy / "rocoin.proto"
    proto.write_text(proto.read_text().replace("double compute_s = 5;", "double compute_s = 5;\n  string note = 99;"))
    assert gen_proto.check(tmp_path / "src") == 1
    assert "stale" in capsys.readouterr().err


def test_generated_grpc_module_imports_the_messages_absolutely():
    text = (PROTOCOL / "rocoin_pb2_grpc.py").read_text()
    assert "from rocoin.runtime.transport.protocol import rocoin_pb2" in text
    from rocoin.runtime.transport.protocol import rocoin_pb2, rocoin_pb2_grpc

    assert rocoin_pb2.DESCRIPTOR.package == "rocoin.v1"
    assert hasattr(rocoin_pb2_grpc, "DeviceStub") and hasattr(rocoin_pb2_grpc, "SourceServicer")
