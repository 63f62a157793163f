"""Generate the Python code for protos/ into protos/python/ (or the folder given as the argument).

This is the one generator of the `usage.v1` package (`usage-service-protos`) that the service and
the Python client both import: `from usage.v1 import usage_pb2`. The output mirrors the proto path.

The code is generated with an old grpcio-tools on purpose: the generated modules refuse a grpcio
older than the grpcio-tools that wrote them and a protobuf older than their gencode, so the
generator sets the floors for everyone who installs the client. grpcio-tools 1.72 is the first to
write protobuf 6 gencode (6.30.0); protobuf supports gencode of major V on runtimes V and V+1, so it
loads without a warning on protobuf 6 and on the service's protobuf 7 (protobuf 5 gencode would
warn on protobuf 6.30-6.31 and is unsupported on 7). 1.72.2 rather than 1.72.1: grpcio 1.68.0 to
1.72.1 (and 1.73.0) leave a channel unable to reconnect after the server restarts, which the
client's retries rely on. That grpcio-tools needs protobuf<7, which the service cannot share, so it
runs from its own virtualenv, made once under .cache/ with exactly GENERATOR installed.

    python tools/genproto.py
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import venv

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PACKAGE = ROOT / "protos" / "python"
CACHE = ROOT / ".cache" / "protogen-venv"
# Exact versions: the committed code is compared byte for byte with this generator's output, and
# protos/python/pyproject.toml and clients/python/pyproject.toml take their floors from it.
GENERATOR = ("grpcio-tools==1.72.2", "grpcio==1.72.2", "protobuf==6.30.0")
_STAMP = "generator.txt"


def generator_python(cache: pathlib.Path = CACHE) -> pathlib.Path:
    """The Python of a virtualenv holding exactly GENERATOR; made (or remade) when missing."""
    wanted = "\n".join(GENERATOR) + "\n"
    python = cache / "bin" / "python"
    stamp = cache / _STAMP
    if python.exists() and stamp.is_file() and stamp.read_text() == wanted:
        return python
    # Built beside the cache and moved into place whole, so an interrupted build is never used.
    building = cache.with_name(f"{cache.name}.{os.getpid()}")
    venv.create(building, with_pip=True, clear=True)
    pip = [building / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-input"]
    subprocess.run([*pip, "--disable-pip-version-check", *GENERATOR], check=True)
    (building / _STAMP).write_text(wanted)
    shutil.rmtree(cache, ignore_errors=True)
    try:
        building.rename(cache)
    except OSError:  # another run put its own in place meanwhile
        shutil.rmtree(building)
    return python


def generate(out: pathlib.Path) -> None:
    files = sorted(p.relative_to(PROTOS).as_posix() for p in PROTOS.rglob("*.proto"))
    if not files:
        raise SystemExit(f"no .proto files under {PROTOS}")
    # `python -m grpc_tools.protoc` adds grpcio-tools' own include (the well-known types).
    args = [
        str(generator_python()),
        "-I",  # isolated: nothing from the caller's environment or user site
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *files,
    ]
    tops = {f.split("/")[0] for f in files}
    for top in tops:  # generated whole: nothing of a removed .proto is left behind
        shutil.rmtree(out / top, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    if subprocess.run(args).returncode != 0:
        raise SystemExit("protoc failed")
    for folder in {(out / f).parent for f in files}:
        for package in [folder, *folder.parents]:
            if package == out or out not in package.parents:
                break
            (package / "__init__.py").touch()
    for top in tops:
        (out / top / "py.typed").touch()


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else PACKAGE)
