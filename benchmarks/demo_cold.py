"""The demo's budget from nothing: a fresh clone, `make demo` under `/usr/bin/time -v`, nothing cached.

    python3 benchmarks/demo_cold.py [--keep]

Clones the repository's HEAD into a temporary folder (so no `.venv`, data cache or generator cache
exists), runs `make demo` there with `/usr/bin/time -v` and writes `results/demo_cold.md`: the wall
time of the whole command (set-up included) and of `vsi demo` by its own clock, the peak resident
memory, the machine's load before the run, the CPU thread count, and the command's output
verbatim (stage lines and gate decisions on stderr, the result table on stdout). The README's demo
section quotes that file. Run it on an otherwise idle machine: the budget is for an idle 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "demo_cold.md"


def _stage_lines(stderr: str) -> list[str]:
    """stderr without progress bars and pip chatter: the stage lines, gate decisions and stop reasons."""
    keep = []
    for line in stderr.replace("\r", "\n").splitlines():
        s = line.strip()
        if s and (s.startswith("[") or s.startswith("round-") or s.startswith("stopping") or s.startswith("run dir")
                  or s.startswith("data:") or s.startswith("warning")):
            keep.append(line.rstrip())
    return keep


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", action="store_true", help="keep the temporary clone (its run directory, report.html)")
    args = ap.parse_args()
    if not shutil.which("make") or not Path("/usr/bin/time").is_file():
        print("demo_cold: needs make and /usr/bin/time", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="vsi-demo-cold-"))
    clone = tmp / "vision_si"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True,
                          check=True).stdout.strip()
    load = os.getloadavg()
    start = time.time()
    proc = subprocess.run(["/usr/bin/time", "-v", "make", "demo"], cwd=clone, capture_output=True, text=True)
    wall = time.time() - start
    err = proc.stderr
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    own = re.findall(r"\[\s*([\d.]+)s\] report written", err)
    threads = subprocess.run([str(clone / ".venv/bin/python"), "-c", "import torch; print(torch.get_num_threads())"],
                             capture_output=True, text=True).stdout.strip() if (clone / ".venv").is_dir() else "?"
    out_lines = [line.rstrip() for line in proc.stdout.splitlines() if line.strip()]
    first = next((i for i, line in enumerate(out_lines) if "test split" in line), max(0, len(out_lines) - 40))
    table = "\n".join(out_lines[first:])
    lines = [
        "# `make demo` on a fresh clone, nothing cached",
        "",
        f"Command: `python3 benchmarks/demo_cold.py` (clone of {head}; `/usr/bin/time -v make demo`).  ",
        f"Exit code: {proc.returncode}; load average before the run: {load[0]:.2f} (1 min), {load[1]:.2f} (5 min); "
        f"{os.cpu_count()} CPUs, torch threads {threads}.",
        "",
        "| what | value |",
        "|---|---|",
        f"| wall time of `make demo` (set-up included) | {wall / 60:.1f} min ({wall:.0f} s) |",
        f"| `vsi demo` by its own clock | {own[-1] + ' s' if own else 'not reached'} |",
        f"| set-up before it (venv, torch from disk, the package) | "
        f"{f'{wall - float(own[-1]):.0f} s' if own else '?'} |",
        f"| peak resident memory (`/usr/bin/time -v`) | {int(rss.group(1)) / 1e6:.2f} GB |" if rss else
        "| peak resident memory | not measured |",
        "",
        "## Output",
        "",
        "stderr (stage lines and gate decisions; progress bars and pip messages left out):",
        "",
        "```",
        *_stage_lines(err),
        "```",
        "",
        "stdout (the result table; the `rounds:` lines wrap at 80 columns when stdout is not a terminal):",
        "",
        "```",
        table,
        "```",
        "",
    ]
    OUT.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    if args.keep:
        print(f"kept: {clone}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
