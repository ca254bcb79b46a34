"""Regenerate the betterproto2 code in app/pb/ from proto/*.proto.

    python tools/gen_proto.py            # rewrite app/pb/
    python tools/gen_proto.py --check    # exit 1 when app/pb/ differs from what proto/ gives

grpclib client and server code, with the descriptors that server reflection serves.
"""

from __future__ import annotations

import argparse
import ast
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"
OUT = ROOT / "app" / "pb"
OPTIONS = "client_generation=async,server_generation=async,google_protobuf_descriptors"


def generate(dest: Path) -> None:
    """Run protoc with the betterproto2 plugin from this interpreter's environment into dest."""
    env = dict(os.environ)
    # the plugin is a console script next to this interpreter
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    protos = sorted(p.name for p in PROTO.glob("*.proto"))
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO}",
            f"--python_betterproto2_out={dest}", f"--python_betterproto2_opt={OPTIONS}", *protos,
        ],
        check=True, env=env, cwd=PROTO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _same(a: Path, b: Path) -> bool:
    """Equal content; Python files compare by syntax tree, since the plugin formats its output
    with whatever ruff is installed and a formatter upgrade is not drift."""
    if a.suffix != ".py":
        return a.read_bytes() == b.read_bytes()
    try:
        return ast.dump(ast.parse(a.read_text())) == ast.dump(ast.parse(b.read_text()))
    except SyntaxError:
        return False


def differences(a: Path, b: Path) -> list[str]:
    """Relative paths of files that differ between two trees (missing on either side included)."""
    out: list[str] = []
    stack = [(filecmp.dircmp(a, b, ignore=["__pycache__"]), Path())]
    while stack:
        c, rel = stack.pop()
        out += [str(rel / n) for n in c.left_only + c.right_only + c.funny_files]
        # dircmp compares shallowly (size and mtime); compare every common file for real
        out += [str(rel / n) for n in c.common_files
                if not _same(Path(c.left) / n, Path(c.right) / n)]  # fmt: skip
        stack += [(sub, rel / name) for name, sub in c.subdirs.items()]
    return sorted(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "pb"
        fresh.mkdir()
        generate(fresh)
        if args.check:
            diff = differences(fresh, OUT) if OUT.exists() else ["app/pb (missing)"]
            for name in diff:
                print(f"drift: app/pb/{name}", file=sys.stderr)
            return 1 if diff else 0
        shutil.rmtree(OUT, ignore_errors=True)
        shutil.copytree(fresh, OUT)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
