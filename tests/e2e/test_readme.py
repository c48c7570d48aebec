"""Every shell and Python block of README.md runs, as written, against a real server.

The blocks run in document order in one bash session (`set -eu`), the way a reader pastes them
into a terminal: variables exported by one block (`TOKEN`, `THREAD`) are there for the next,
and a Python block runs as `python <block>.py` from that session. New blocks are picked up by
themselves.

The one substitution: the README's `localhost:8000` becomes the test server's address
(`127.0.0.1:<free port>`), since port 8000 may be taken on the machine running the tests.
A block preceded by `<!-- readme-test: skip (reason) -->` is not run; only blocks that cannot
run here carry it (they install packages, start a server themselves or need PostgreSQL).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import StartServer, clean_environment

pytestmark = pytest.mark.e2e

README = Path(__file__).parents[2] / "README.md"
_BLOCK = re.compile(
    r"(?:<!-- readme-test: skip \((?P<reason>[^)]*)\) -->\n)?"
    r"^```(?P<lang>bash|python|sh|shell)\n(?P<code>.*?)^```",
    re.MULTILINE | re.DOTALL,
)
_ADDRESS = re.compile(r"localhost:8000")
RUN_TIMEOUT = 180.0


@dataclass(frozen=True)
class Block:
    number: int
    lang: str
    code: str
    skip_reason: str | None


def readme_blocks() -> list[Block]:
    return [
        Block(number, m["lang"], m["code"], m["reason"])
        for number, m in enumerate(_BLOCK.finditer(README.read_text()), start=1)
    ]


def _script(blocks: list[Block], workdir: Path, address: str) -> str:
    lines = ["set -eu"]
    for block in blocks:
        if block.skip_reason is not None:
            continue
        code = _ADDRESS.sub(address, block.code)
        lines.append(f"echo '::block {block.number}::'")
        if block.lang == "python":
            path = workdir / f"block_{block.number}.py"
            path.write_text(code)
            lines.append(f"python {path}")
        else:
            lines.append(code)
    lines.append("echo '::end::'")
    return "\n".join(lines)


def test_every_skipped_block_says_why_and_most_blocks_run():
    blocks = readme_blocks()
    assert all(block.skip_reason for block in blocks if block.skip_reason is not None)
    run = [block for block in blocks if block.skip_reason is None]
    assert len(run) >= 4, blocks
    assert {block.lang for block in run} >= {"bash", "python"}


def test_the_readme_runs_as_written(tmp_path: Path, serve_process: StartServer):
    workdir = tmp_path / "server"
    workdir.mkdir()
    server = serve_process(workdir, clean_environment(THREADLINE_DATA_DIR=str(tmp_path / "d")))
    blocks = readme_blocks()
    script = _script(blocks, tmp_path, f"127.0.0.1:{server.port}")
    # The README's `python` is the one with Threadline's dependencies (websockets).
    env = clean_environment(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    output = result.stdout
    report = f"exit {result.returncode}\n--- stdout\n{output[-4000:]}\n--- stderr\n{result.stderr}"
    assert result.returncode == 0 and output.rstrip().endswith("::end::"), report
    for block in blocks:
        if block.skip_reason is None:
            assert f"::block {block.number}::" in output, report
    # What the README promises the reader sees.
    assert "12*7 = 84." in output, report  # the agent's answer, read after the run completed
    assert "event: agent_completed" in output, report  # the SSE watch ended there
    assert " agent_completed " in output, report  # the WebSocket watch printed it and returned
    # The two deletes: archived (204, still there), then removed (204, then 404). (A JSON
    # body ends without a newline, so the next status follows it on the same line.)
    deletes = re.search(r'^204\n.*"status":"archived".*204\n404$', output, re.MULTILINE)
    assert deletes is not None, report
    assert "Traceback" not in server.output(), server.output()[-3000:]
