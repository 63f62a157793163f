"""The committed Python stubs are exactly what the protos generate."""

from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_committed_stubs_match_the_protos(tmp_path: pathlib.Path) -> None:
    spec = importlib.util.spec_from_file_location("genproto", ROOT / "tools" / "genproto.py")
    assert spec and spec.loader
    genproto = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(genproto)
    genproto.generate(tmp_path)
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    committed_root = ROOT / "service"
    committed = {
        p.relative_to(committed_root): p.read_bytes()
        for p in (committed_root / "usage").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert sorted(fresh) == sorted(committed), "stub files differ: run python tools/genproto.py"
    stale = [str(name) for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale stubs {stale}: run python tools/genproto.py"


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
