"""The committed app/pb/ must be what tools/gen_proto.py makes from proto/."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT


def test_generated_code_matches_proto() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_proto.py"), "--check"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"run tools/gen_proto.py:\n{result.stderr}"
