"""The wire contract: committed stubs are what the protos generate; protos pass buf's STANDARD
lint."""

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / ".tools" / "node_modules" / ".bin" / "buf"


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    out = tmp_path / "proto"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(out)], check=True
    )
    committed = ROOT / "tandem" / "proto"
    fresh = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    ours = sorted(
        p.relative_to(committed)
        for p in committed.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    assert fresh == ours
    stale = [str(p) for p in fresh if not filecmp.cmp(out / p, committed / p, shallow=False)]
    assert not stale, f"regenerate with scripts/gen_protos.py: {stale}"


def test_protos_pass_buf_standard_lint():
    assert BUF.exists(), "buf is installed by scripts/bootstrap.sh (npm @bufbuild/buf)"
    result = subprocess.run([str(BUF), "lint"], cwd=ROOT / "protos", capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_service_has_its_proto():
    names = {p.parent.parent.name for p in (ROOT / "protos" / "tandem").rglob("*.proto")}
    assert names == {"common", "prefill", "decode", "router", "kvstore"}
