"""Run every benchmark (quick scale by default, ``--full`` for the full scale) and write the results table
into ``benchmarks/README.md`` between its markers, with the machine, date and command.

Each benchmark prints lines ``name: <value> <unit>, ratio <x> vs <baseline> (goal >= <g>)``; those lines are
the table. ``make bench`` runs this at the quick scale (under 10 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bench_data.py", "bench_simulate.py", "bench_train.py", "bench_precision.py"]
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
LINE = re.compile(r"^([a-z0-9_.]+): (.*)$")


def machine() -> str:
    import torch

    from deeplense.util import cpu_name

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu_name()}, {gpu}; Python {platform.python_version()}, torch {torch.__version__}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="full scale (37,500 files, more steps, torch.compile)")
    p.add_argument("--no-readme", action="store_true", help="print only; do not touch benchmarks/README.md")
    args = p.parse_args(argv)
    rows, t0 = [], time.time()
    env = {**os.environ, "TQDM_DISABLE": "1"}
    for script in SCRIPTS:
        cmd = [sys.executable, str(HERE / script)] + (["--full"] if args.full else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        out = proc.stdout
        sys.stdout.write(out)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            print(f"{script} failed with exit status {proc.returncode}", file=sys.stderr)
            return proc.returncode
        for line in out.splitlines():
            m = LINE.match(line.strip())
            if m:
                rows.append((script, m.group(1), m.group(2)))
    elapsed = time.time() - t0
    if args.no_readme:
        return 0
    scale = "full (`make bench-full`)" if args.full else "quick (`make bench`)"
    table = [f"Machine: {machine()}  ", f"Date: {dt.date.today().isoformat()}; scale: {scale}; "
             f"wall time {elapsed / 60:.1f} min.", "", "| benchmark | result | script |", "|---|---|---|"]
    table += [f"| `{name}` | {text.replace('|', '/')} | `{script}` |" for script, name, text in rows]
    from deeplense.util import replace_section

    readme = HERE / "README.md"
    replace_section(readme, START, END, "\n".join(table))
    print(f"wrote the table into {readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
