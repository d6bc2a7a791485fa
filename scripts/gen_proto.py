#!/usr/bin/env python
"""Regenerate rocoin's protobuf/gRPC Python modules from its .proto files (or check they are fresh).

    python scripts/gen_proto.py           # rewrite the *_pb2.py, *_pb2.pyi, *_pb2_grpc.py modules
    python scripts/gen_proto.py --check   # exit 1 when the committed modules differ from a fresh run

The proto is compiled with ``-I src`` so the generated gRPC module imports
``from rocoin.runtime.transport.protocol import rocoin_pb2`` (an absolute, installable import).

The generated files record the generator's versions (``# Protobuf Python Version: ...``,
``GRPC_GENERATED_VERSION``, the runtime version check); ``--check`` ignores those lines, so a
different grpcio-tools release that emits the same code does not count as stale.
Needs ``grpcio-tools`` (a development dependency; devices only need grpcio and protobuf).
"""

from __future__ import annotations

import argparse
import difflib
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
OUT_DIR = Path("rocoin/runtime/transport/protocol")  # relative to SRC, the include root
#: rocoin's own protocol, and the Open Inference Protocol (KServe v2) the source serves to clients.
PROTOS = (OUT_DIR / "rocoin.proto", OUT_DIR / "inference.proto")
PROTO = PROTOS[0]
GENERATED = tuple(f"{p.stem}{suffix}" for p in PROTOS for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))
EXPECTED_IMPORTS = tuple(f"from rocoin.runtime.transport.protocol import {p.stem}_pb2" for p in PROTOS)

#: Lines that only record which generator release wrote the file.
_VERSION_LINE = re.compile(
    r"^(# Protobuf Python Version: .*"
    r"|GRPC_GENERATED_VERSION = .*"
    r"|\s*_runtime_version\.Domain\.PUBLIC,\s*$"
    r"|\s*\d+,\s*$"
    r"|\s*'',\s*$)"
)


def generate(out_root: Path, src: Path = SRC) -> None:
    """Run protoc on ``src``'s proto into ``out_root`` (which gets ``rocoin/runtime/transport/protocol/...``)."""
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError:
        sys.exit("error: grpcio-tools is not installed (pip install grpcio-tools)")
    include = Path(grpc_tools.__file__).parent / "_proto"
    (out_root / OUT_DIR).mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{src}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(src / proto) for proto in PROTOS),
    ]
    code = protoc.main(args)
    if code != 0:
        sys.exit(f"error: protoc failed with exit code {code} on {', '.join(map(str, PROTOS))}")
    for proto, expected in zip(PROTOS, EXPECTED_IMPORTS):
        grpc_module = (out_root / OUT_DIR / f"{proto.stem}_pb2_grpc.py").read_text(encoding="utf-8")
        if expected not in grpc_module:
            sys.exit(f"error: the generated gRPC module of {proto} does not contain {expected!r}; check the -I root")


def _normalised(text: str) -> list[str]:
    return [line for line in text.splitlines() if not _VERSION_LINE.match(line)]


def check(src: Path = SRC) -> int:
    """0 when the modules under ``src`` match a fresh run; 1 (with the differences on stderr) otherwise."""
    stale = []
    with tempfile.TemporaryDirectory(prefix="rocoin-proto-") as tmp:
        generate(Path(tmp), src)
        for name in GENERATED:
            fresh = (Path(tmp) / OUT_DIR / name).read_text(encoding="utf-8")
            committed_path = src / OUT_DIR / name
            if not committed_path.is_file():
                stale.append(f"{committed_path}: missing")
                continue
            committed = committed_path.read_text(encoding="utf-8")
            if _normalised(fresh) != _normalised(committed):
                diff = difflib.unified_diff(
                    _normalised(committed), _normalised(fresh), f"committed/{name}", f"fresh/{name}", lineterm="", n=1
                )
                stale.append(f"{committed_path}: differs from a fresh run\n" + "\n".join(list(diff)[:20]))
    if stale:
        print("error: the generated protocol modules are stale; run `python scripts/gen_proto.py`", file=sys.stderr)
        for item in stale:
            print(f"  {item}", file=sys.stderr)
        return 1
    print(f"generated protocol modules are up to date with {', '.join(map(str, PROTOS))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the committed modules are fresh")
    args = parser.parse_args(argv)
    if args.check:
        return check()
    with tempfile.TemporaryDirectory(prefix="rocoin-proto-") as tmp:
        generate(Path(tmp))
        for name in GENERATED:
            shutil.copyfile(Path(tmp) / OUT_DIR / name, SRC / OUT_DIR / name)
            print(f"wrote {(SRC / OUT_DIR / name).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
