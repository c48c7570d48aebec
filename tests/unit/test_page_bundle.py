"""The page's own checks that need Node but no browser.

The wheel ships the built files (installing needs no Node), so a change to the sources without
a rebuild would ship a stale page: one test builds a fresh copy and compares it byte for byte.
The other runs `web/test` (`node --test`): the conversation reducer's invariants (a replayed
event changes nothing, history overlapping live events keeps one copy, where outcomes go).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
WEB = REPO / "web"
ASSETS = REPO / "src" / "threadline" / "web" / "assets"


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("Node.js is needed for the page's checks (.ci/run expects node and npm)")
    return node


def test_page_logic() -> None:
    node = _node()
    ran = subprocess.run(
        [node, "--test", "test/"],
        cwd=WEB,
        env={"PATH": str(Path(node).parent)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "# fail 0" in ran.stdout, ran.stdout


def test_committed_bundle_matches_the_sources(tmp_path: Path) -> None:
    node = _node()
    if not (WEB / "node_modules" / "esbuild").exists():
        pytest.fail("web/node_modules is missing: run `npm ci --prefix web` (.ci/run does this)")
    built = subprocess.run(
        [node, "build.mjs"],
        cwd=WEB,
        env={"PATH": str(Path(node).parent), "OUTDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    fresh = sorted(path.name for path in tmp_path.iterdir())
    assert fresh, "the build wrote nothing"
    stale = [
        name for name in fresh if (ASSETS / name).read_bytes() != (tmp_path / name).read_bytes()
    ]
    assert not stale, (
        f"{stale} differ from a fresh build: run `npm run build --prefix web` and commit"
    )
