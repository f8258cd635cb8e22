#!/usr/bin/env python3
"""Line coverage per crate from `cargo llvm-cov report --json --summary-only`.

Usage: coverage.py COVERAGE_JSON [CRATE=MINIMUM_PERCENT ...]

Prints one line per workspace crate (files under its directory; tests of a
crate count as its code only where they sit in its src/), and exits 1 when a
crate named with a minimum is under it, or has no measured lines at all.
"""

import json
import os
import sys


def per_crate(report, root):
    crates = {}
    for export in report["data"]:
        for f in export["files"]:
            path = os.path.relpath(f["filename"], root)
            if path.startswith(".."):
                continue  # a dependency's source
            crate = path.split(os.sep, 1)[0]
            lines = f["summary"]["lines"]
            count, covered = crates.get(crate, (0, 0))
            crates[crate] = (count + lines["count"], covered + lines["covered"])
    return crates


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(argv[1]) as f:
        crates = per_crate(json.load(f), root)
    minimums = {}
    for arg in argv[2:]:
        crate, _, minimum = arg.partition("=")
        minimums[crate] = float(minimum)

    failed = []
    print("line coverage by crate:")
    for crate in sorted(crates):
        count, covered = crates[crate]
        percent = 100.0 * covered / count if count else 0.0
        minimum = minimums.get(crate)
        verdict = ""
        if minimum is not None:
            ok = count > 0 and percent >= minimum
            verdict = f"  (minimum {minimum:.0f} %: {'ok' if ok else 'UNDER'})"
            if not ok:
                failed.append(crate)
        print(f"  {crate:<12} {percent:6.2f} %  {covered:>6} of {count:>6} lines{verdict}")
    for crate in minimums:
        if crate not in crates:
            print(f"  {crate:<12} no lines measured  (minimum {minimums[crate]:.0f} %: UNDER)")
            failed.append(crate)
    if failed:
        print(f"coverage under the minimum: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
