"""Regenerates the committed protobuf/gRPC Python code from the .proto files.

Run from anywhere: `python -m protos.generate`. Uses grpcio-tools==1.84.0 so the generated code imports under any
grpcio >= 1.84.0 (the GPU machines run 1.84.0). `tests/protos/test_protos_current.py` fails when the committed code is stale.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = Path(__file__).resolve().parent
REQUIRED_TOOLS_VERSION = "1.84.0"


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Writes generated modules for every .proto under protos/ into out_dir (mirroring repo paths)."""
    import grpc_tools
    from grpc_tools import protoc
    from importlib.metadata import version

    installed = version("grpcio-tools")
    if installed != REQUIRED_TOOLS_VERSION:
        raise SystemExit(f"grpcio-tools=={REQUIRED_TOOLS_VERSION} is required, found {installed}")
    include = Path(grpc_tools.__file__).parent / "_proto"
    files = [str(p.relative_to(REPO_ROOT)) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_dir / "protos").rglob("*_pb2*.py*"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: the repo)")
    args = parser.parse_args()
    written = generate(args.out)
    for p in written:
        print(p.relative_to(args.out))
    sys.exit(0)


if __name__ == "__main__":
    main()
