"""The generated usage.v1 package is exactly what the protos generate, and its floors are right."""

from __future__ import annotations

import importlib.util
import pathlib
import re
import subprocess
import sys
import tomllib
from types import ModuleType

from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "protos" / "python"


def _genproto() -> ModuleType:
    spec = importlib.util.spec_from_file_location("genproto", ROOT / "tools" / "genproto.py")
    assert spec and spec.loader
    genproto = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(genproto)
    return genproto


def test_committed_code_matches_the_protos(tmp_path: pathlib.Path) -> None:
    """Regenerates with the pinned generator (its virtualenv is made once under .cache/)."""
    _genproto().generate(tmp_path)
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    committed = {
        p.relative_to(PACKAGE): p.read_bytes()
        for p in (PACKAGE / "usage").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert sorted(fresh) == sorted(committed), "files differ: run python tools/genproto.py"
    stale = [str(name) for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated code {stale}: run python tools/genproto.py"


def _floor(pyproject: pathlib.Path, name: str) -> str:
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    (requirement,) = [Requirement(d) for d in dependencies if Requirement(d).name == name]
    (floor,) = [s.version for s in requirement.specifier if s.operator == ">="]
    return str(floor)


def test_the_floors_are_the_versions_that_generated_the_code() -> None:
    """What the generated modules check at import is what the packages ask pip for, no more."""
    grpc_code = (PACKAGE / "usage" / "v1" / "usage_pb2_grpc.py").read_text()
    grpc_match = re.search(r"^GRPC_GENERATED_VERSION = '([0-9.]+)'$", grpc_code, re.MULTILINE)
    pb_code = (PACKAGE / "usage" / "v1" / "usage_pb2.py").read_text()
    pb_match = re.search(r"^# Protobuf Python Version: ([0-9.]+)$", pb_code, re.MULTILINE)
    assert grpc_match and pb_match
    pins = set(_genproto().GENERATOR)
    assert {f"grpcio-tools=={grpc_match[1]}", f"protobuf=={pb_match[1]}"} <= pins
    for pyproject in (PACKAGE / "pyproject.toml", ROOT / "clients" / "python" / "pyproject.toml"):
        assert _floor(pyproject, "grpcio") == grpc_match[1], pyproject
        assert _floor(pyproject, "protobuf") == pb_match[1], pyproject


def test_the_generated_code_imports_without_a_warning() -> None:
    """Its grpcio and protobuf version checks pass quietly on the service's versions."""
    code = "import usage.v1.usage_pb2_grpc, usage.v1.customer_pb2_grpc"
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""


def test_buf_breaking_catches_a_renamed_field(tmp_path: pathlib.Path) -> None:
    """CI runs `buf breaking` against the last release's image; it must catch a rename."""
    import shutil
    import subprocess

    buf = ROOT / "node_modules" / ".bin" / "buf"
    assert buf.exists(), "run `npm install` first (scripts/test does)"
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    image = str(ROOT / "protos-release" / "usage-v1.binpb")
    same = subprocess.run([buf, "breaking", "--against", image], cwd=tmp_path, capture_output=True)
    assert same.returncode == 0, same.stdout
    proto = tmp_path / "protos" / "usage" / "v1" / "usage.proto"
    proto.write_text(proto.read_text().replace("  string meter = 2;", "  string meter_name = 2;"))
    renamed = subprocess.run(
        [buf, "breaking", "--against", image], cwd=tmp_path, capture_output=True, text=True
    )
    assert renamed.returncode != 0
    assert 'changed name from "meter" to "meter_name"' in renamed.stdout
