"""Where the work runs and how: the device, its numeric precision, and the memory it leaves for data and batches.

Every device-dependent choice of the engine is read from one :class:`Plan`, made once per command by
:func:`plan_for`, so that a branch for a device we do not have (CUDA, Apple MPS) can be exercised on the CPU by
building the plan it would get. The choices, and why:

- **precision** (``--precision``, :data:`PRECISIONS`): ``auto`` means bf16 autocast on a CUDA GPU with native
  bf16 (compute capability 8.0 and later: A100, H100, RTX 30xx and later); fp16 autocast with a gradient scaler on
  older CUDA GPUs (T4, V100, Colab's free tier), where ``torch.cuda.is_bf16_supported()`` would say yes but
  only emulates bf16, without cuDNN, slowly; fp32 on Apple MPS and on the CPU. bf16 on a CPU is opt-in
  (``--precision bf16``) and refused on a CPU without native bf16 (AVX512-BF16 or AMX), where it is emulated:
  about 20x slower than fp32 on the AVX2 build machines (``cpu_precision`` in benchmarks/README.md).
- **copies**: ``non_blocking`` only to CUDA (on MPS a non-blocking copy from a temporary that is freed at once
  can read freed memory, an open PyTorch issue); ``channels_last`` only on CUDA (where cuDNN's kernels want it).
- **sums**: the epoch's loss is summed on the device in float64, except on MPS, which has no float64: there in
  float32 (a relative error of about 1e-7 per addition; a 30,000-image epoch's mean loss is off by < 1e-4).
- **memory** (:func:`memory_plan`): the training set lives on the GPU only when it fits together with the
  training step's and the validation batch's activations; the validation batch is the largest power of 2 up to
  1024 that fits.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

import torch

from .config import PRECISIONS
from .util import DeepLenseError, cpu_name

__all__ = ["PRECISIONS", "MemoryPlan", "Plan", "memory_plan", "pick_device", "plan_for"]


# --------------------------------------------------------------------------------------------- the device
def gpu_present_but_unusable() -> str | None:
    """A one-line explanation when an NVIDIA GPU answers ``nvidia-smi`` but this torch cannot use it (a CPU-only
    wheel, or a CUDA build newer than the driver); None otherwise."""
    if torch.cuda.is_available():
        return None
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        r = subprocess.run([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0 or not r.stdout.strip():
        return None
    gpu = r.stdout.strip().splitlines()[0]
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    return (f"an NVIDIA GPU is present ({gpu}; nvidia-smi) but torch {torch.__version__} ({build}) cannot use it, "
            f"so this runs on the CPU; install a torch build for this driver (README, docs/devices.md: Installing on "
            f"a GPU machine)")


_warned: set[str] = set()


def pick_device(requested: str | None = None, *, warn=None) -> torch.device:
    """The ``torch.device`` to run on: ``requested`` (``cpu``, ``cuda``, ``cuda:1``, ``mps``) if this machine has
    it, else CUDA, then Apple MPS, then the CPU. A CUDA device is made the current one (``torch.cuda.set_device``),
    so that capability checks and default allocations concern the GPU actually used. When a GPU is present but
    unusable, ``warn`` (default: one line on stderr, once per process) says so instead of a silent CPU run."""
    if requested and requested != "auto":
        try:
            dev = torch.device(requested)
        except (RuntimeError, ValueError):
            raise DeepLenseError(f"--device {requested}: not a device (cpu, cuda, cuda:1, mps)") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                why = gpu_present_but_unusable()
                raise DeepLenseError(f"--device {requested}: CUDA is not available on this machine"
                                     + (f" ({why})" if why else ""))
            count = torch.cuda.device_count()
            if dev.index is not None and not 0 <= dev.index < count:
                raise DeepLenseError(f"--device {requested}: this machine has {count} CUDA device(s) "
                                     f"(cuda:0{f' .. cuda:{count - 1}' if count > 1 else ''})")
            dev = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
            torch.cuda.set_device(dev)
            return dev
        if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise DeepLenseError(f"--device {requested}: Apple MPS is not available on this machine")
        if dev.type not in ("cpu", "cuda", "mps"):
            raise DeepLenseError(f"--device {requested}: not supported (cpu, cuda, cuda:N or mps)")
        return dev
    if torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
        return dev
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return torch.device("mps")
    why = gpu_present_but_unusable()
    if why:
        (warn or _warn_once)(f"warning: {why}")
    return torch.device("cpu")


def _warn_once(line: str) -> None:
    if line not in _warned:
        _warned.add(line)
        print(line, file=sys.stderr, flush=True)


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere torch emulates it, slowly."""
    check = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(f()) for f in check if f is not None)


def cuda_native_bf16(device: torch.device) -> bool:
    """Whether the CUDA ``device`` has bf16 in hardware (compute capability >= 8.0); ``torch.cuda.
    is_bf16_supported()`` with its default ``including_emulation=True`` also says yes for older cards, which only
    emulate it. It asks about the current device: :func:`pick_device` made ``device`` the current one."""
    if device.index is not None and device.index != torch.cuda.current_device():
        torch.cuda.set_device(device)
    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


# --------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Plan:
    """How the engine runs on ``device``: ``precision`` (``fp32``, ``bf16`` or ``fp16``) and why."""

    device: torch.device
    precision: str
    reason: str = ""
    emulate: str | None = None
    """Take the branches of this device type (``cuda`` or ``mps``) while computing on ``device``: how the tests
    run the CUDA and MPS code paths on the CPU."""

    @property
    def kind(self) -> str:
        """The device type whose branches the engine takes."""
        return self.emulate or self.device.type

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self):
        """The autocast context of the model's forward pass (a no-op in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @property
    def uses_scaler(self) -> bool:
        """fp16 needs a gradient scaler (its range underflows small gradients); bf16 and fp32 do not."""
        return self.precision == "fp16"

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type if self.uses_scaler else "cuda", enabled=self.uses_scaler)

    @property
    def non_blocking(self) -> bool:
        """Copies to the device are asynchronous on CUDA only (see the module docstring for MPS)."""
        return self.kind == "cuda"

    @property
    def channels_last(self) -> bool:
        return self.kind == "cuda"

    @property
    def sum_dtype(self) -> torch.dtype:
        """The dtype of running sums on the device: float64, except on MPS (no float64 there)."""
        return torch.float32 if self.kind == "mps" else torch.float64

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=self.non_blocking)

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def describe(self) -> str:
        name = {"fp32": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast + gradient scaler"}[self.precision]
        return f"{name} on {self.device}" + (f" ({self.reason})" if self.reason else "")


def plan_for(device: torch.device | str, precision: str = "auto") -> Plan:
    """The :class:`Plan` for ``device`` at the requested ``precision`` (one of :data:`PRECISIONS`); a
    precision the device cannot do natively is a :class:`DeepLenseError`."""
    dev = torch.device(device)
    if precision not in PRECISIONS:
        raise DeepLenseError(f"--precision {precision}: choose from {', '.join(PRECISIONS)}")
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        cap = ".".join(map(str, torch.cuda.get_device_capability(dev)))
        native = cuda_native_bf16(dev)
        if precision == "auto":
            return Plan(dev, "bf16", f"native bf16 on {name}") if native else \
                Plan(dev, "fp16", f"{name} (compute capability {cap}) has no native bf16")
        if precision == "bf16" and not native:
            raise DeepLenseError(f"--precision bf16: {name} (compute capability {cap}) only emulates bf16, "
                                 f"slowly and without cuDNN; use fp16 or auto")
        return Plan(dev, precision, "requested")
    if precision == "fp16":
        raise DeepLenseError(f"--precision fp16: needs a CUDA GPU (this run is on {dev.type}); use fp32 or auto")
    if dev.type == "mps":
        if precision == "bf16":
            raise DeepLenseError("--precision bf16: not supported on Apple MPS here; use fp32 or auto")
        return Plan(dev, "fp32", "Apple MPS: fp32")
    if precision == "bf16":
        if not cpu_native_bf16():
            raise DeepLenseError("--precision bf16: this CPU has no native bf16 (AVX512-BF16 or AMX); torch would "
                                 "emulate it, about 20x slower than fp32; use fp32 or auto")
        return Plan(dev, "bf16", "requested; native bf16 on this CPU")
    if precision == "fp32":
        return Plan(dev, "fp32", "requested")
    # auto: bf16 where the CPU has it natively (1.6-1.8x the training speed; held-out AUC within noise of fp32 in the
    # paired study of docs/studies.md, "Networks on the realistic preset"); fp32 elsewhere
    if cpu_native_bf16():
        return Plan(dev, "bf16", "native bf16 on this CPU (--precision fp32 for fp32)")
    return Plan(dev, "fp32", "CPU without native bf16")


# --------------------------------------------------------------------------------------------- memory
@functools.lru_cache(maxsize=32)
def activation_bytes(arch: str, image_size: int, element_bytes: int = 2) -> tuple[int, int]:
    """Per image, ``(training, inference)`` activation memory of ``arch`` at ``image_size`` px, estimated by
    tracing the network on the meta device (no memory, no weights): training keeps every module's output for the
    backward pass (their sum); inference holds about three at once (a block's input, its output and the
    residual: 3 x the largest). ``element_bytes``: 2 under bf16/fp16 autocast, 4 in fp32."""
    from .config import input_channels
    from .model import build_model

    with torch.device("meta"):
        model, _ = build_model("none", arch=arch, image_size=image_size)
    outputs = []

    def hook(module, args, out):
        if isinstance(out, torch.Tensor) and not list(module.children()):
            outputs.append(out.numel())

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(torch.empty(1, input_channels(arch), image_size, image_size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return sum(outputs) * element_bytes, 3 * max(outputs) * element_bytes


@dataclass(frozen=True)
class MemoryPlan:
    """Where the data lives and how large the validation batches are, with the estimates behind it (bytes)."""

    resident: bool
    eval_batch_size: int
    free: int
    data: int
    model: int
    train_peak: int
    eval_peak: int

    def describe(self) -> str:
        gb = 1e9
        return (f"{self.free / gb:.1f} GB free: data {self.data / gb:.1f} GB "
                f"{'on the device' if self.resident else 'kept in host memory'}, model and optimiser "
                f"{self.model / gb:.2f} GB, training step ~{self.train_peak / gb:.1f} GB, validation batch "
                f"{self.eval_batch_size} ~{self.eval_peak / gb:.1f} GB")


def memory_plan(arch: str, image_size: int, batch_size: int, n_params: int, data_bytes: int, free_bytes: int,
                eval_batch_size: int | None = None, element_bytes: int = 2, headroom: float = 0.8) -> MemoryPlan:
    """Budget the data, the model with its AdamW state, the training step and the validation batch together.

    The data go on the device only if, with them there, the training step and a validation batch of at least 128
    (or the given ``eval_batch_size``) still fit in ``headroom`` of ``free_bytes``; the validation batch is then the
    largest power of 2 up to 1024 that fits in what is left (or ``eval_batch_size`` when given)."""
    train_per, eval_per = activation_bytes(arch, image_size, element_bytes)
    model = 4 * 4 * n_params  # weights, gradients, AdamW's two moments, float32
    train_peak = train_per * batch_size
    budget = int(headroom * free_bytes)

    def eval_batch(room: int) -> int:
        if eval_batch_size:
            return eval_batch_size
        bs = 1024
        while bs > 16 and bs * eval_per > room:
            bs //= 2
        return bs

    room_resident = budget - data_bytes - model
    want = eval_batch_size or 128
    resident = room_resident >= train_peak and room_resident >= want * eval_per
    room = room_resident if resident else budget - model
    bs = eval_batch(room)
    return MemoryPlan(resident, bs, int(free_bytes), int(data_bytes), model, train_peak, bs * eval_per)


def free_memory(device: torch.device) -> int:
    """Bytes a new allocation can use on CUDA ``device``: what the driver reports free plus what PyTorch's caching
    allocator holds but does not use (``memory_reserved - memory_allocated``)."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def default_timeout_minutes() -> float:
    """The collective-operation timeout under torchrun: ``$DEEPLENSE_DIST_TIMEOUT_MIN`` (default 60 minutes, so
    that rank 0's first cache build on a slow filesystem does not trip NCCL's 10-minute default)."""
    try:
        return float(os.environ.get("DEEPLENSE_DIST_TIMEOUT_MIN", 60))
    except ValueError:
        raise DeepLenseError(f"DEEPLENSE_DIST_TIMEOUT_MIN={os.environ['DEEPLENSE_DIST_TIMEOUT_MIN']!r}: expected "
                             f"minutes") from None


def hardware_name(device=None) -> str:
    """What ran the work on ``device`` (a ``torch.device`` or its name; None: the one :func:`pick_device`
    chooses): the GPU's name for CUDA, otherwise the CPU's."""
    dev = torch.device(device) if device is not None else pick_device(None)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    if dev.type == "mps":
        return f"Apple MPS ({cpu_name()})"
    return cpu_name()
