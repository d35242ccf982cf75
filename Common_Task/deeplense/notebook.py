"""The annotated notebook's side of the package: its parameters, its data, its provenance line, its execution.

The notebook tells the story; everything it computes goes through functions here or in the other modules, so
the tests reach it.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

from .config import SCALES, TrainConfig, check_fields, recipe
from .data import CLASS_LABELS, CLASSES
from .device import hardware_name, pick_device, plan_for
from .util import REPO, DeepLenseError, git_commit

NOTEBOOK = REPO / "Common_Task" / "DeepLense_Classification.ipynb"


@dataclass(frozen=True)
class RunSpec:
    """Where a notebook run reads and writes, at which scale, on which device (the training settings are the
    :class:`~deeplense.config.TrainConfig` beside it)."""

    scale: str
    data: str | None  # the user's dataset folder; None: a simulated set
    sim_train_per_class: int
    sim_val_per_class: int
    output: str
    figures: str
    device: str
    device_name: str
    tta: bool = True  # evaluate with 8-way D4 test-time averaging
    precision: str = ""  # the precision path on this device (deeplense.device.Plan.describe)

    def __post_init__(self):
        check_fields(self, "notebook parameters")  # "500" -> 500, "false" -> False, as TrainConfig's
        if self.sim_train_per_class < 1 or self.sim_val_per_class < 1:
            raise DeepLenseError("notebook parameters: SIM_TRAIN_PER_CLASS and SIM_VAL_PER_CLASS must be at least 1")

    @property
    def data_kind(self) -> str:
        return "real (user-supplied)" if self.data else "simulated (lenstronomy, realistic preset)"


# The parameters' names: each TrainConfig field upper-cased (the parameters cell shows the common ones; any other,
# e.g. AUGMENTATION, may be added to it or set as DEEPLENSE_AUGMENTATION), then the RunSpec's. The environment
# variable DEEPLENSE_<NAME> overrides each (for CI, papermill-like runs and `make demo`).
TRAINING = {f.name.upper(): f.name for f in fields(TrainConfig)}
RUN = {"DATA": "data", "SCALE": "scale", "OUTPUT": "output", "FIGURES": "figures", "DEVICE": "device",
       "SIM_TRAIN_PER_CLASS": "sim_train_per_class", "SIM_VAL_PER_CLASS": "sim_val_per_class", "TTA": "tta"}
PARAMETERS = (*TRAINING, *RUN)


PATHS = ("DATA", "OUTPUT", "FIGURES")
"""The parameters that name a folder: a relative one given in the environment is taken from where the command ran
(:func:`run_notebook` makes it absolute before the kernel, which runs in ``Common_Task/``, starts)."""
OTHER_VARIABLES = ("CACHE", "DIST_TIMEOUT_MIN", "BENCH_RESULTS")
"""``DEEPLENSE_*`` variables that are not notebook parameters: the load cache, the torchrun timeout, the benchmarks'
results file."""


def env_name(parameter: str) -> str:
    return f"DEEPLENSE_{parameter}"


def check_environment(environ=None) -> None:
    """Refuse a ``DEEPLENSE_*`` variable that is neither a parameter nor one of :data:`OTHER_VARIABLES` (a misspelt
    ``DEEPLENSE_EPOCH=3`` would otherwise be ignored and the run train for the scale's epochs)."""
    import difflib

    environ = os.environ if environ is None else environ
    known = {env_name(k) for k in (*PARAMETERS, *OTHER_VARIABLES)}
    for name in sorted(environ):
        if name.startswith("DEEPLENSE_") and name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"did you mean {close[0]}?" if close else "see the notebook's parameters cell"
            raise DeepLenseError(f"{name}: not a notebook parameter ({hint}); unset it or correct the name")


def resolve(namespace: dict) -> tuple[TrainConfig, RunSpec]:
    """The run the notebook's parameters cell describes: one frozen training config and one run spec.

    ``namespace`` is the notebook's ``globals()``; of it only :data:`PARAMETERS` are read. Each may be
    overridden by ``DEEPLENSE_<NAME>`` (``DEEPLENSE_CROP=none``: no crop). A parameter left at ``None`` follows
    the scale (``full`` on a GPU with a real dataset, ``demo`` otherwise).
    """
    check_environment()
    given = {k: namespace.get(k) for k in PARAMETERS}
    from_env = {k: os.environ[env_name(k)] for k in PARAMETERS if env_name(k) in os.environ}
    given.update(from_env)

    def text(k):  # an optional string parameter: "" and "none" in the environment mean None
        v = given[k]
        return None if v is None or (k in from_env and v.strip().lower() in ("", "none", "null")) else str(v)

    data = text("DATA")
    if data is None and (REPO / "dataset").exists():
        data = str(REPO / "dataset")
    device = pick_device(text("DEVICE"))
    scale_name = text("SCALE") or ("full" if device.type == "cuda" and data is not None else "demo")
    if scale_name not in SCALES:
        raise DeepLenseError(f"SCALE={scale_name!r}: choose from {', '.join(SCALES)}")
    scale = SCALES[scale_name]
    overrides = {field: given[k] for k, field in TRAINING.items()
                 if k != "RECIPE" and (given[k] is not None or k in from_env)}
    config = recipe(text("RECIPE") or scale.recipe, scale=scale_name, **overrides)

    def given_or(k, default):  # cast and checked by RunSpec, as TrainConfig casts the training parameters
        return default if given[k] is None else given[k]

    spec = RunSpec(scale=scale_name, data=data,
                   sim_train_per_class=given_or("SIM_TRAIN_PER_CLASS", scale.sim_train_per_class),
                   sim_val_per_class=given_or("SIM_VAL_PER_CLASS", scale.sim_val_per_class),
                   output=str(Path(text("OUTPUT") or REPO / "demo_output").resolve()),
                   figures=str(Path(text("FIGURES") or REPO / "images").resolve()),
                   device=str(device), device_name=hardware_name(device), tta=given_or("TTA", True),
                   precision=plan_for(device, config.precision).describe())
    return config, spec


def provenance_line(config: TrainConfig, spec: RunSpec) -> str:
    """Commit, date, device, data and scale of this run, for the notebook's first output."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    data = spec.data_kind + (f" at {spec.data}" if spec.data else "")
    return (f"commit {git_commit()} | {now} | device {spec.device} ({spec.device_name}), {spec.precision} | "
            f"data: {data} | "
            f"scale {spec.scale}: {config.epochs} epochs, input {config.image_size} px"
            + (f" from the central {config.crop} px" if config.crop else "")
            + f", batch {config.batch_size}, recipe {config.recipe}, weights {config.weights}, seed {config.seed}")


def ensure_data(config: TrainConfig, spec: RunSpec, progress: bool = True) -> str:
    """The dataset path: the user's, or a simulated set (seeded by the run's seed) generated once into the cache."""
    if spec.data:
        return spec.data
    from .simulate import default_simulated_dataset

    return str(default_simulated_dataset(seed=config.seed, train_per_class=spec.sim_train_per_class,
                                         val_per_class=spec.sim_val_per_class, progress=progress))


RUN_MARKER = ".deeplense-notebook-run"
"""The file a notebook run leaves in its run folder: a folder holding it (and only what a notebook run writes) may be
emptied by the next notebook run; any other folder that is not empty is refused, never deleted."""
_RUN_FILES = {"config.json", "history.jsonl", "last.pt", "best.pt", "metrics.json", "predictions.npz", ".lock",
              RUN_MARKER, NOTEBOOK.name}
_RUN_FOLDERS = {"figures": (".png", ".pdf"), "explain": (".json", ".npz", ".png", ".pdf")}


def _previous_run(path: Path) -> list[Path]:
    """What a previous notebook run left in ``path`` (the files to remove before this run), or a
    :class:`DeepLenseError` naming what it did not write: nothing is ever deleted that a notebook run did not write."""
    from .util import TEMP_NAME

    if not path.is_dir():
        raise DeepLenseError(f"{path}: is a file, not a folder; choose another OUTPUT (--out)")
    entries = sorted(path.iterdir())
    if not entries:
        return []
    if not (path / RUN_MARKER).is_file():
        what = "a training run" if (path / "config.json").is_file() else f"{entries[0].name}"
        raise DeepLenseError(f"{path}: holds {what} that no notebook run wrote; nothing was deleted; choose another "
                             f"OUTPUT (--out), or remove the folder yourself")
    found = []
    for e in entries:
        inner = sorted(e.iterdir()) if e.is_dir() and not e.is_symlink() and e.name in _RUN_FOLDERS else None
        if inner is not None:
            foreign = [f for f in inner if not (f.is_file() and f.suffix in _RUN_FOLDERS[e.name])]
        else:
            foreign = [] if (e.is_file() and (e.name in _RUN_FILES or TEMP_NAME.search(e.name))) else [e]
        if foreign:
            raise DeepLenseError(f"{path}: a previous notebook run, but {foreign[0]} is not something it wrote; "
                                 f"nothing was deleted; move it away or choose another OUTPUT (--out)")
        found += [*inner, e] if inner is not None else [e]
    return found


def check_run_folder(path: str | Path) -> Path:
    """Refuse (:class:`DeepLenseError`), before any work, an output folder :func:`fresh_run_folder` would refuse."""
    path = Path(path)
    if path.exists():
        _previous_run(path)
    return path


def fresh_run_folder(path: str | Path) -> Path:
    """Make ``path`` an empty run folder marked as this notebook's (:data:`RUN_MARKER`). A previous notebook run
    there is removed, file by file, only when every file in it is one a notebook run writes; a training run of
    ``python -m deeplense train`` or any other content is refused with one line and left as it was."""
    path = Path(path)
    if path.exists():
        for f in _previous_run(path):  # files first, then their (now empty) folders
            f.rmdir() if f.is_dir() else f.unlink()
    path.mkdir(parents=True, exist_ok=True)
    (path / RUN_MARKER).write_text("written by the DeepLense notebook: the next notebook run may replace this "
                                   "folder's run files\n")
    return path


def show(path: str | Path, width: int):
    """The figure at ``path`` (a PNG of ``images/``, 300 dpi) for display at ``width`` screen pixels: a copy shrunk
    to that width, so the notebook stores a preview, not a second copy of the full-resolution file (which stays
    in the figures folder beside its PDF). The preview is the smaller of a 64-colour PNG (plots: a few flat
    colours) and a JPEG at quality 85 (the noisy sky of the example images), so the notebook stays small."""
    import io

    from IPython.display import Image as Shown
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.width > width:
            im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
        png, jpeg = io.BytesIO(), io.BytesIO()
        im.quantize(colors=64).save(png, format="PNG", optimize=True)
        im.save(jpeg, format="JPEG", quality=85)
    fmt, buf = min((("png", png), ("jpeg", jpeg)), key=lambda kv: len(kv[1].getvalue()))
    return Shown(data=buf.getvalue(), format=fmt, width=width)


_MASKS = (
    (re.compile(r"\[(?:[-\d., ]+|interval n/a[^\]]*)\]"), "[CI]"),  # an interval, or why a small test has none
    (re.compile(r"(?:[A-Za-z]:)?(?:/[\w.~+@-]+)+/?"), "PATH"),  # folders differ from machine to machine
    (re.compile(r"weights: (?:ImageNet|random initialisation)"), "weights: W"),  # whether the file was cached
    (re.compile(r"device (?:cpu|mps|cuda(?::\d+)?)"), "device D"),
    (re.compile(r"\b(?:" + "|".join(sorted(set(CLASS_LABELS.values()) | set(CLASSES), key=len, reverse=True))
                + r")\b"), "CLASS"),  # the classes come in the order of this run's AUCs
    (re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?"), "#"),  # every number is the run's
)


def output_signature(notebook) -> list[tuple[int, list[str]]]:
    """What the notebook shows, whatever the run: per code cell, the number of figures and its Markdown outputs
    (the recipe, the results table, the reading of the curves) with every number, path, class name and weights
    state masked. Two runs of the same code at the same input geometry (the demo and tiny scales share the crop),
    on any data and device, give the same signature; a change to what the package prints there (a row added, a
    figure dropped, a sentence reworded) changes it: the test that the committed outputs are not stale.
    ``notebook``: a path or an nbformat notebook."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4) if isinstance(notebook, (str, Path)) else notebook
    out = []
    for cell in (c for c in nb.cells if c.cell_type == "code"):
        data = [o.get("data", {}) for o in cell.get("outputs", [])]
        figures = sum(1 for d in data if "image/png" in d or "image/jpeg" in d)
        texts = []
        for d in data:
            if "text/markdown" in d:
                text = d["text/markdown"]
                for pattern, mask in _MASKS:
                    text = pattern.sub(mask, text)
                texts.append("\n".join(sorted(text.splitlines())))  # findings list classes in the run's order
        out.append((figures, texts))
    return out


def run_notebook(notebook: str | Path = NOTEBOOK, *, output_dir: str | Path | None = None, env: dict | None = None,
                 save_to: str | Path | None = None, timeout: int = 7200) -> Path:
    """Execute the notebook top to bottom with nbclient and save it with its outputs (in place by default)."""
    import sys
    import time

    import nbformat
    from nbclient import NotebookClient

    from .util import atomic_path

    notebook = Path(notebook)
    nb = nbformat.read(notebook, as_version=4)
    env = {k: str(v) for k, v in (env or {}).items()}
    if output_dir:
        env[env_name("OUTPUT")] = str(Path(output_dir).resolve())
    for k in map(env_name, PATHS):  # the kernel runs in Common_Task/: a relative folder is the caller's
        value = env.get(k, os.environ.get(k))
        if value and value.strip().lower() not in ("none", "null") and not Path(value).is_absolute():
            env[k] = str(Path(value).resolve())
    check_environment({**os.environ, **env})
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    t0 = time.time()
    current = [0]

    def on_start(cell, cell_index):
        if cell.cell_type == "code":
            k = code_cells.index(cell) + 1
            current[0] = k
            first = next((ln for ln in cell.source.splitlines() if ln.strip() and not ln.startswith("#")), "")
            print(f"[{time.time() - t0:6.0f} s] cell {k}/{len(code_cells)}: {first[:70]}", file=sys.stderr,
                  flush=True)

    from nbclient.exceptions import CellExecutionError

    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", on_cell_start=on_start, coalesce_streams=True,
                       record_timing=False, resources={"metadata": {"path": str(notebook.parent)}}).execute()
    except CellExecutionError as exc:  # one line, not the kernel's whole traceback
        what = f"{exc.ename}: {str(exc.evalue).strip().splitlines()[0] if str(exc.evalue).strip() else ''}"
        raise DeepLenseError(f"{notebook}: cell {current[0]}/{len(code_cells)} failed: {what.rstrip(': ')} "
                             f"(the notebook file is left as it was)") from None
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    for cell in nb.cells:  # no timings: a re-run that prints the same changes nothing in the file
        cell.metadata.pop("execution", None)
    target = Path(save_to) if save_to else notebook
    with atomic_path(target, suffix=".ipynb") as tmp:
        nbformat.write(nb, tmp)
    return target


__all__ = ["NOTEBOOK", "PARAMETERS", "RunSpec", "check_environment", "check_run_folder", "ensure_data",
           "fresh_run_folder", "provenance_line", "resolve",
           "run_notebook", "show"]
