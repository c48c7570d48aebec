"""Issue 11's ratios from one sitting: Threadline's bench/runs.py JSON beside the peer's.

    python bench/peer/compare.py /tmp/th.json /tmp/peer.json

For each number of users measured by both: runs per second and server CPU per run of each,
and the ratios Threadline ÷ peer (above 1 for runs/s, below 1 for CPU, is Threadline ahead),
with the completion p50/p99 and the load average after each. Standard library only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

Level = dict[str, Any]  # one level of either JSON file, as loaded


def levels_by_users(levels: list[Level]) -> dict[int, Level]:
    return {level["users"]: level for level in levels}


def threadline_levels(result: dict[str, Any]) -> list[Level]:
    topologies = result["topologies"]
    if not isinstance(topologies, dict) or len(topologies) != 1:
        raise SystemExit("give a bench/runs.py result with one backend and one topology")
    (only,) = topologies.values()
    return list(only["levels"])


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        raise SystemExit(__doc__)
    threadline = json.loads(Path(argv[0]).read_text())
    peer = json.loads(Path(argv[1]).read_text())
    ours = levels_by_users(threadline_levels(threadline))
    theirs = levels_by_users(peer["levels"])
    for users in sorted(set(ours) & set(theirs)):
        t, p = ours[users], theirs[users]
        rate = float(t["runs_per_second"]) / float(p["runs_per_second"])
        cpu = float(t["server_cpu_ms_per_run"]) / float(p["server_cpu_ms_per_run"])
        print(
            f"{users} users: runs/s {t['runs_per_second']} vs {p['runs_per_second']} "
            f"(x{rate:.2f}); server CPU/run {t['server_cpu_ms_per_run']} vs "
            f"{p['server_cpu_ms_per_run']} ms (x{cpu:.2f})"
        )
        for name, level in (("threadline", t), ("peer", p)):
            done = level["agent_completed_ms"]
            print(
                f"  {name}: completion p50/p99 {done['p50']}/{done['p99']} ms, "
                f"load {level['load_average_before'][0]} -> {level['load_average_after'][0]}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
