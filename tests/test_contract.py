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
