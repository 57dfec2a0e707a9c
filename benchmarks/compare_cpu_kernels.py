"""Compare builds of the tile-kernel harness (benchmarks/cpu_kernels.cpp) on a noisy machine.

Each build is run in turn, round after round, so that a slow minute of the machine falls on every
build alike; the table gives each loop's minimum, first quartile and median over the rounds (each
run already reports its best of --reps calls). Read the minimum for what a quiet core does, the
quartile and median for what the loop does while other tenants load the memory system.

    g++ -O3 -std=c++20 -fopenmp-simd -Wno-psabi -I csrc benchmarks/cpu_kernels.cpp -o /tmp/before
    # ... change a header ...
    g++ -O3 -std=c++20 -fopenmp-simd -Wno-psabi -I csrc benchmarks/cpu_kernels.cpp -o /tmp/after
    python benchmarks/compare_cpu_kernels.py /tmp/before /tmp/after --rounds 30 \\
        --args "--reps 3 --interaction inner"
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
from collections import defaultdict


def parse_rows(text: str) -> dict[tuple[str, str], float]:
    """The harness's table rows `| interaction | pass | ms | ... |` as {(interaction, pass): ms}."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in ("inner", "outer", "kernel"):
            rows[(cells[0], cells[1])] = float(cells[2])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("builds", nargs="+", help="harness executables to compare")
    parser.add_argument("--rounds", type=int, default=20, help="runs of each build, alternated")
    parser.add_argument("--args", default="--reps 3", help="arguments passed to every run (one string)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds: expected a positive count, got {args.rounds}")

    times: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for _ in range(args.rounds):
        for index, build in enumerate(args.builds):
            try:
                out = subprocess.run([build, *shlex.split(args.args)], capture_output=True, text=True)
            except OSError as err:
                parser.error(f"builds: cannot run {build!r}: {err}")
            if out.returncode != 0:
                sys.stderr.write(out.stderr)
                parser.error(f"builds: {build!r} exited with {out.returncode}")
            rows = parse_rows(out.stdout)
            if not rows:
                parser.error(f"builds: {build!r} printed no timing table")
            for (kind, pass_), ms in rows.items():
                times[(kind, pass_, index)].append(ms)

    print(f"{args.rounds} alternated runs of each build, `{args.args}`; ms over the runs\n")
    print("| interaction | pass | build | min | q25 | median |")
    print("|---|---|---|---|---|---|")
    order = {"inner": 0, "outer": 1, "kernel": 2}
    for kind, pass_, index in sorted(times, key=lambda k: (order[k[0]], k[1], k[2])):
        v = sorted(times[(kind, pass_, index)])
        q25 = statistics.quantiles(v, n=4, method="inclusive")[0] if len(v) > 1 else v[0]
        print(f"| {kind} | {pass_} | {args.builds[index]} | {v[0]:.2f} | {q25:.2f} | {statistics.median(v):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
