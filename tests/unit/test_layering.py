"""The package layers hold: the torch-free floor and the SDK load no torch, and the import
contracts in pyproject.toml (checked by ``make lint``, so by ``make test``) catch an upward
import."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def test_the_torch_free_floor_and_the_sdk_load_no_torch():
    code = (
        "import importlib, pkgutil, sys\n"
        "import tandem.api, tandem.sdk\n"
        "for m in pkgutil.iter_modules(tandem.api.__path__, 'tandem.api.'):\n"
        "    importlib.import_module(m.name)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in\n"
        "               ('torch', 'transformers', 'tandem'))\n"
        "print(' '.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    loaded = out.stdout.split()
    assert "tandem.api.sampling_request" in loaded and "tandem.sdk.client" in loaded
    assert not [m for m in loaded if m.split(".")[0] in ("torch", "transformers")]
    assert not [m for m in loaded if m.startswith(("tandem.engine", "tandem.serving"))]


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}  # the copy, not the installed tree
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_an_upward_import_breaks_the_contracts(tmp_path):
    tree = tmp_path / "tree"
    for part in ("tandem", "services"):
        shutil.copytree(ROOT / part, tree / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    kept = lint_imports(tree)
    assert kept.returncode == 0, kept.stdout + kept.stderr

    with (tree / "tandem" / "api" / "errors.py").open("a") as f:
        f.write("\nimport tandem.serving.pod  # upward: the floor reaching a pod part\n")
    broken = lint_imports(tree)
    assert broken.returncode != 0
    assert "tandem.api is not allowed to import tandem.serving" in broken.stdout
    assert "tandem.api.errors -> tandem.serving.pod" in broken.stdout
