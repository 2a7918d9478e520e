"""Generate the Python gRPC stubs under tandem/proto/ from protos/ (the only way they are made).

protoc names modules after the proto path (``tandem.decode.v1.decode_pb2``); the stubs live in
``tandem.proto.decode.v1``, so the generated imports are rewritten to that package.

    python scripts/gen_protos.py             # regenerate in place
    python scripts/gen_protos.py --out DIR   # write elsewhere (tests compare with the committed
                                             # copy)
"""

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
_IMPORT = re.compile(r"\b(from|import) tandem\.(common|prefill|decode|router|kvstore)\.v1\b")


def generate(out: Path) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc

    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTOS}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *files,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(Path(tmp) / "tandem", out)
    written = []
    for path in sorted(out.rglob("*.py*")):
        path.write_text(_IMPORT.sub(r"\1 tandem.proto.\2.v1", path.read_text()))
        written.append(path)
    for pkg in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        (pkg / "__init__.py").write_text(
            ""
            if pkg != out
            else '"""Generated gRPC stubs: do not edit; run scripts/gen_protos.py."""\n'
        )
    return written


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "tandem" / "proto")
    args = ap.parse_args()
    written = generate(args.out)
    print(f"wrote {len(written)} files under {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
