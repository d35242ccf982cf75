"""Run every benchmark that fits the scale (quick by default, ``--full`` for the full scale), judge each goal, and
write the results table into ``benchmarks/README.md`` between its markers, with the machine, date and command.

Each benchmark reports its results through ``common.emit``, which also appends them as JSON lines to the file
named by ``$DEEPLENSE_BENCH_RESULTS``: this script reads those, not the printed text. It ends with a summary of
the goals met and missed. ``make bench`` runs this at the quick scale (under 10 minutes on 2 CPU cores);
``bench_gpu.py`` reports a skip line on a machine without CUDA.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS_ENV, read_results

HERE = Path(__file__).resolve().parent
SCRIPTS = {  # script: (arguments at the quick scale, at the full scale); None: not at that scale
    "bench_data.py": ([], ["--full"]),
    "bench_simulate.py": ([], ["--full"]),
    "bench_train.py": ([], ["--full"]),
    "bench_precision.py": ([], ["--full"]),
    "bench_gpu.py": (["--quick", "--no-compile"], []),
    "bench_archs.py": (None, []),  # minutes per arch on a CPU; its README table: make bench-archs
}


def machine() -> str:
    import torch

    from deeplense.util import cpu_name

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu_name()}, {gpu}; Python {platform.python_version()}, torch {torch.__version__}"


def goal_cell(r: dict) -> str:
    if r.get("goal") is None:
        return ""
    return f"{r['on']} {r['goal']}: " + {True: "met", False: "**missed**", None: "n/a"}[r.get("met")]


def summary(rows: list[tuple[str, dict]]) -> str:
    judged = [(script, r) for script, r in rows if r.get("met") is not None]
    missed = [f"{r['name']} ({r['on']} {r['goal']})" for _, r in judged if not r["met"]]
    return (f"goals met: {len(judged) - len(missed)} of {len(judged)}"
            + (f"; missed: {', '.join(missed)}" if missed else ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="full scale (37,500 files, more steps, torch.compile)")
    p.add_argument("--no-readme", action="store_true", help="print only; do not touch benchmarks/README.md")
    args = p.parse_args(argv)
    rows, t0 = [], time.time()
    with tempfile.TemporaryDirectory(prefix="deeplense-bench-") as tmp:
        for script, (quick, full) in SCRIPTS.items():
            extra = full if args.full else quick
            if extra is None:
                continue
            results = Path(tmp) / f"{script}.jsonl"
            env = {**os.environ, "TQDM_DISABLE": "1", RESULTS_ENV: str(results)}
            proc = subprocess.run([sys.executable, str(HERE / script), *extra], capture_output=True, text=True,
                                  env=env)
            sys.stdout.write(proc.stdout)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-4000:])
                print(f"{script} failed with exit status {proc.returncode}", file=sys.stderr)
                return proc.returncode
            rows += [(script, r) for r in read_results(results)]
    elapsed = time.time() - t0
    line = summary(rows)
    print(line)
    if args.no_readme:
        return 0
    scale = "full (`make bench-full`)" if args.full else "quick (`make bench`)"
    table = [f"Machine: {machine()}  ", f"Date: {dt.date.today().isoformat()}; scale: {scale}; "
             f"wall time {elapsed / 60:.1f} min; {line}.", "",
             "| benchmark | result | goal | script |", "|---|---|---|---|"]
    table += [f"| `{r['name']}` | {r['text'].replace('|', '/')} | {goal_cell(r)} | `{script}` |" for script, r in rows]
    from deeplense.report import write_section

    print(f"wrote the table into {write_section('bench', chr(10).join(table), HERE.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
