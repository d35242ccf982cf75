"""Helpers for the annotated notebook: parameters, scale, provenance, execution and the README table.

The notebook tells the story; everything it computes goes through functions here or in the other
modules, so the tests reach it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "Common_Task" / "DeepLense_Classification.ipynb"

# Environment variables that override the notebook's parameters cell (for CI, papermill-like runs, make demo).
ENV = {
    "DATA": "DEEPLENSE_DATA", "RECIPE": "DEEPLENSE_RECIPE", "EPOCHS": "DEEPLENSE_EPOCHS",
    "IMAGE_SIZE": "DEEPLENSE_IMAGE_SIZE", "CROP": "DEEPLENSE_CROP", "BATCH_SIZE": "DEEPLENSE_BATCH_SIZE",
    "WEIGHTS": "DEEPLENSE_WEIGHTS", "SEED": "DEEPLENSE_SEED", "OUTPUT": "DEEPLENSE_OUTPUT",
    "FIGURES": "DEEPLENSE_FIGURES", "SIM_TRAIN_PER_CLASS": "DEEPLENSE_SIM_TRAIN_PER_CLASS",
    "SIM_VAL_PER_CLASS": "DEEPLENSE_SIM_VAL_PER_CLASS", "SCALE": "DEEPLENSE_SCALE", "DEVICE": "DEEPLENSE_DEVICE",
}


@dataclass(frozen=True)
class Scale:
    """What a run trains on and how long. ``full``: the recipe's own settings; ``demo``: sized for a
    2-core CPU (about 10 minutes) and still well above chance."""

    name: str
    epochs: int
    image_size: int
    crop: int | None
    batch_size: int
    sim_train_per_class: int
    sim_val_per_class: int
    limit_per_class: int | None = None


SCALES = {
    # the official set's size and the recipe's own input (224 px); for a GPU
    "full": Scale("full", epochs=20, image_size=224, crop=None, batch_size=64, sim_train_per_class=10_000,
                  sim_val_per_class=2_500),
    # 2-core CPU, random initial weights: many images, only the ring region (central 96 px) shrunk to 64 px;
    # measured: selection macro AUC 0.80, 0.95, 0.97 after epochs 2-4 at about 25 img/s
    "demo": Scale("demo", epochs=5, image_size=64, crop=96, batch_size=32, sim_train_per_class=1_000,
                  sim_val_per_class=500),
    # the test suite's: seconds, not meaningful numbers
    "tiny": Scale("tiny", epochs=1, image_size=32, crop=96, batch_size=8, sim_train_per_class=4,
                  sim_val_per_class=20),
}


def _cast(value: str, like):
    if like is None or isinstance(like, str):
        return None if value.lower() in ("", "none", "null") else value
    if isinstance(like, bool):
        return value.lower() in ("1", "true", "yes")
    return type(like)(value)


def resolve(params: dict, *, typed_defaults: dict | None = None) -> dict:
    """Apply ``DEEPLENSE_*`` environment overrides to the parameters cell's values, find the data, pick the
    device and the scale, and fill every ``None`` from the scale. Returns a plain dict."""
    import torch

    from .util import pick_device

    p = {k: params.get(k) for k in ENV}
    typed = typed_defaults or {"EPOCHS": 1, "IMAGE_SIZE": 1, "CROP": 1, "BATCH_SIZE": 1, "SEED": 0,
                               "SIM_TRAIN_PER_CLASS": 1, "SIM_VAL_PER_CLASS": 1}
    for k, env in ENV.items():
        if env in os.environ:
            p[k] = _cast(os.environ[env], typed.get(k, p[k]))
    data = p["DATA"]
    if data is None and (REPO / "dataset").exists():
        data = str(REPO / "dataset")
    device = pick_device(p["DEVICE"])  # None or "auto": CUDA, then MPS, then CPU
    if p["SCALE"] is None:
        p["SCALE"] = "full" if (device.type == "cuda" and data is not None) else "demo"
    scale = SCALES[p["SCALE"]]
    for key, field in (("EPOCHS", "epochs"), ("IMAGE_SIZE", "image_size"), ("BATCH_SIZE", "batch_size"),
                       ("SIM_TRAIN_PER_CLASS", "sim_train_per_class"), ("SIM_VAL_PER_CLASS", "sim_val_per_class")):
        if p[key] is None:
            p[key] = getattr(scale, field)
    if p["CROP"] is None and ENV["CROP"] not in os.environ:  # DEEPLENSE_CROP=none means no crop
        p["CROP"] = scale.crop
    p["RECIPE"] = p["RECIPE"] or "default"
    p["WEIGHTS"] = p["WEIGHTS"] or "auto"
    p["SEED"] = int(p["SEED"] or 0)
    p["OUTPUT"] = str(Path(p["OUTPUT"] or REPO / "demo_output").resolve())
    p["FIGURES"] = str(Path(p["FIGURES"] or REPO / "images").resolve())
    p["DATA"] = data
    p["DATA_KIND"] = "real (user-supplied)" if data else "simulated (lenstronomy, common_task preset)"
    p["DEVICE"] = str(device)
    p["DEVICE_NAME"] = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    p["SCALE_DETAILS"] = asdict(scale)
    return p


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    import platform

    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+uncommitted changes" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance_line(p: dict) -> str:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"commit {git_commit()} | {now} | device {p['DEVICE']} ({p['DEVICE_NAME']}) | "
            f"data: {p['DATA_KIND']}{'' if not p['DATA'] else ' at ' + p['DATA']} | scale {p['SCALE']}")


def ensure_data(p: dict, progress: bool = True) -> str:
    """The dataset path: the user's, or a simulated set generated once into the cache."""
    if p["DATA"]:
        return p["DATA"]
    from .simulate import default_simulated_dataset

    return str(default_simulated_dataset(seed=p["SEED"], train_per_class=p["SIM_TRAIN_PER_CLASS"],
                                         val_per_class=p["SIM_VAL_PER_CLASS"], progress=progress))


def run_notebook(notebook: str | Path = NOTEBOOK, *, output_dir: str | Path | None = None, env: dict | None = None,
                 save_to: str | Path | None = None, timeout: int = 7200) -> Path:
    """Execute the notebook top to bottom with nbclient and save it with its outputs (in place by default)."""
    import nbformat
    from nbclient import NotebookClient

    notebook = Path(notebook)
    nb = nbformat.read(notebook, as_version=4)
    old = {k: os.environ.get(k) for k in (env or {})}
    if output_dir:
        old.setdefault("DEEPLENSE_OUTPUT", os.environ.get("DEEPLENSE_OUTPUT"))
        os.environ["DEEPLENSE_OUTPUT"] = str(Path(output_dir).resolve())
    os.environ.update({k: str(v) for k, v in (env or {}).items()})
    import sys
    import time

    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    t0 = time.time()

    def on_start(cell, cell_index):
        if cell.cell_type == "code":
            k = code_cells.index(cell) + 1
            first = next((ln for ln in cell.source.splitlines() if ln.strip() and not ln.startswith("#")), "")
            print(f"[{time.time() - t0:6.0f} s] cell {k}/{len(code_cells)}: {first[:70]}", file=sys.stderr,
                  flush=True)

    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", on_cell_start=on_start, coalesce_streams=True,
                       resources={"metadata": {"path": str(notebook.parent)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    target = Path(save_to) if save_to else notebook
    from .util import atomic_path

    with atomic_path(target, suffix=".ipynb") as tmp:
        nbformat.write(nb, tmp)
    return target


# ------------------------------------------------------------------------------------------------- README
START, END = "<!-- results:start -->", "<!-- results:end -->"


def results_table(metrics: dict) -> str:
    """A Markdown table of accuracy and AUCs with 95% intervals, from a ``metrics.json`` dict."""
    ci = metrics["ci"]

    def cell(v, c):
        if v is None:
            return "n/a"
        return f"{v:.3f} [{c[0]:.3f}, {c[1]:.3f}]" if c else f"{v:.3f}"

    prov = metrics.get("provenance", {})
    rows = [("accuracy", metrics["accuracy"], ci["accuracy"]),
            ("macro AUC (mean of per-class one-vs-rest)", metrics["auc"]["macro"], ci["macro_auc"]),
            ("micro AUC (pooled one-vs-rest)", metrics["auc"]["micro"], ci["micro_auc"])]
    labels = {"no": "no substructure", "sphere": "subhalos", "vort": "vortex"}
    rows += [(f"AUC {labels[c]} (`{c}`)", v, ci["per_class_auc"][c]) for c, v in metrics["auc"]["per_class"].items()]
    lines = ["| metric | value [95% bootstrap interval] |", "|---|---|"]
    lines += [f"| {name} | {cell(v, c)} |" for name, v, c in rows]
    cfg = prov.get("config", {})
    lines += ["", f"Held-out test set: n = {metrics['n']} ({prov.get('split_description', '')}); "
                  f"recipe `{prov.get('recipe')}`, {cfg.get('epochs')} epochs, input {cfg.get('image_size')} px"
                  + (f" (central {cfg.get('crop')} px crop)" if cfg.get("crop") else "")
                  + f", weights: {'ImageNet' if prov.get('pretrained') else 'random initialisation'}; "
                  f"device {prov.get('device')}; seed {prov.get('seed')}; TTA {'on' if prov.get('tta') else 'off'}."]
    return "\n".join(lines)


def update_readme(metrics_path: str | Path, readme: str | Path = REPO / "README.md", extra: str = "") -> None:
    """Replace the text between the results markers in README.md with the table from ``metrics_path``."""
    from .util import replace_section

    metrics = json.loads(Path(metrics_path).read_text())
    replace_section(readme, START, END, f"{extra}{results_table(metrics)}")
