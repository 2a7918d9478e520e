"""The container image recipe, checked without a container engine (CI has none).

What can be checked offline is checked for real: the build context the Dockerfile sees (after
.dockerignore) is assembled file by file and the package is built from it with pip, so a module
or data file missing from the image fails here rather than in a cluster.
"""

import fnmatch
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "deploy/docker/Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    return [
        (m.group(1).upper(), m.group(2).strip())
        for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.M)
        if not m.group(0).lstrip().startswith("#")
    ]


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def build_context() -> list[Path]:
    """Files of the repository the Docker build sees, following .dockerignore's rules in order."""
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    kept = []
    for name in tracked:
        included = True
        for rule in rules:
            negate = rule.startswith("!")
            pattern = rule.lstrip("!").rstrip("/")
            hit = (
                fnmatch.fnmatch(name, pattern)
                or name.startswith(pattern + "/")
                or pattern == "**"
                or (pattern.startswith("**/") and fnmatch.fnmatch(name, "*" + pattern[2:]))
            )
            if hit:
                included = negate
        if included:
            kept.append(Path(name))
    return kept


def test_multi_stage_non_root_cli_entrypoint_and_no_model():
    steps = instructions()
    assert sum(op == "FROM" for op, _ in steps) >= 2
    final = final_stage()
    users = [arg for op, arg in final if op == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), (
        "the image must run as a numeric non-root user"
    )
    assert ("ENTRYPOINT", '["tandem"]') in final
    copies = [arg for op, arg in final if op == "COPY"]
    assert copies == [
        "--from=build /opt/tandem /opt/tandem"
    ]  # only the built environment reaches the runtime
    for op, arg in steps:  # no weights are fetched, generated or copied at build time
        assert op != "ADD"
        if op in ("COPY", "RUN"):
            assert not re.search(r"safetensors|models?/|model-gen|model-fetch|\.tandem", arg), arg


def test_build_context_holds_the_package_and_nothing_heavy():
    context = {str(p) for p in build_context()}
    for required in (
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "services/cli.py",
        "services/router/app.py",
    ):
        assert required in context
    for op, arg in instructions():
        if op == "COPY" and not arg.startswith("--from"):
            *sources, _ = arg.split()
            for source in sources:
                assert any(
                    c == source or c.startswith(source.rstrip("/") + "/") for c in context
                ), source
    heavy = [c for c in context if c.endswith((".safetensors", ".bin", ".pt", ".whl"))]
    assert heavy == [] and not any(
        c.startswith(("tests/", ".venv/", ".git/", "bench/")) for c in context
    )


@pytest.mark.slow
def test_the_package_builds_from_exactly_the_build_context(tmp_path):
    context = tmp_path / "context"
    for relative in build_context():
        target = context / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, target)
    out = tmp_path / "wheel"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(context),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = out.glob("tandem-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in (
        "services/cli.py",
        "tandem/model_fetch.py",
        "services/router/discovery.py",
        "services/kvstore/server.py",
        "tandem/proto/decode/v1/decode_pb2.py",
    ):
        assert module in names, module
    assert any(
        n.startswith("tandem/assets/") and n.endswith(".txt") for n in names
    )  # model-gen's corpus
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "tandem = services.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
