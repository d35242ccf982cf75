"""Device paths we do not have (CUDA GPUs old and new, Apple MPS, torchrun on GPUs), forced on the CPU.

Each test takes the branch a user on that device would take, either by faking what ``torch.cuda`` reports or by
running the engine with a :class:`~deeplense.device.Plan` that takes another device type's branches while it
computes on the CPU (``emulate``).
"""

from __future__ import annotations

import datetime
import json
import subprocess

import numpy as np
import pytest
import torch

import deeplense.device as device_mod
import deeplense.engine as engine
from deeplense.cli import main
from deeplense.config import TrainConfig, recipe
from deeplense.device import MemoryPlan, Plan, free_memory, memory_plan, pick_device, plan_for
from deeplense.model import build_model
from deeplense.testing import FAST, quiet
from deeplense.util import DeepLenseError


def _tiny(seed=0, n=12):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 40, 40, generator=g), torch.randint(0, 3, (n,), generator=g)


def _epoch(plan: Plan, cfg: TrainConfig, monkeypatch=None):
    torch.manual_seed(0)
    model = build_model("none", arch="resnet18")[0]
    x, y = _tiny()
    placed = engine.Placement(x, y, x[:4], plan, resident=True, batch_size=cfg.batch_size)
    opt = engine.build_optimizer(model, cfg, plan)
    sched = engine.build_scheduler(opt, cfg, engine.steps_per_epoch(len(x), cfg.batch_size))
    return engine.train_one_epoch(model, opt, sched, plan.grad_scaler(), placed, cfg, epoch=1, progress=False)


# ---------------------------------------------------------------------------------------------- Apple MPS
def test_mps_epoch_needs_no_float64_and_copies_blocking(monkeypatch):
    """MPS has no float64 and corrupts non-blocking copies from freed temporaries: an epoch on the MPS branch
    creates no float64 tensor and copies nothing non-blocking; the CUDA branch does copy non-blocking."""
    cfg = TrainConfig(image_size=32, batch_size=4, weights="none", warmup_epochs=0.0)
    real_zeros, real_to = torch.zeros, torch.Tensor.to
    blocking = []

    def zeros(*a, **k):  # what MPS answers
        if k.get("dtype") == torch.float64:
            raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support "
                            "float64. Please use float32 instead.")
        return real_zeros(*a, **k)

    def to(self, *a, **k):
        blocking.append(bool(k.get("non_blocking", False)))
        return real_to(self, *a, **k)

    monkeypatch.setattr(torch, "zeros", zeros)
    monkeypatch.setattr(torch.Tensor, "to", to)
    rec = _epoch(Plan(torch.device("cpu"), "fp32", emulate="mps"), cfg)
    assert np.isfinite(rec["train_loss"]) and rec["train_images"] == 12
    assert blocking and not any(blocking), "a non-blocking copy on the MPS branch"
    monkeypatch.setattr(torch, "zeros", real_zeros)
    blocking.clear()
    _epoch(Plan(torch.device("cpu"), "fp32", emulate="cuda"), cfg)
    assert any(blocking), "the CUDA branch should copy non-blocking (else the check above proves nothing)"
    assert plan_for("mps").precision == "fp32"


# ---------------------------------------------------------------------------------------------- CUDA, faked
class FakeCuda:
    """Two GPUs: cuda:0 a Tesla T4 (compute capability 7.5, bf16 emulated only), cuda:1 an A100 (8.0)."""

    names = {0: "Tesla T4", 1: "NVIDIA A100-SXM4-40GB"}
    caps = {0: (7, 5), 1: (8, 0)}

    def __init__(self, monkeypatch):
        self.current = 0
        self.set_calls = []
        c = torch.cuda
        monkeypatch.setattr(c, "is_available", lambda: True)
        monkeypatch.setattr(c, "device_count", lambda: 2)
        monkeypatch.setattr(c, "current_device", lambda: self.current)
        monkeypatch.setattr(c, "set_device", self.set_device)
        monkeypatch.setattr(c, "get_device_name", lambda d=None: self.names[self._index(d)])
        monkeypatch.setattr(c, "get_device_capability", lambda d=None: self.caps[self._index(d)])
        monkeypatch.setattr(c, "is_bf16_supported", self.is_bf16_supported)

    def _index(self, d):
        if d is None:
            return self.current
        d = torch.device(d) if not isinstance(d, int) else torch.device("cuda", d)
        return self.current if d.index is None else d.index

    def set_device(self, d):
        self.current = self._index(d)
        self.set_calls.append(self.current)

    def is_bf16_supported(self, including_emulation: bool = True):  # torch's semantics: the current device
        return including_emulation or self.caps[self.current] >= (8, 0)


def test_old_gpus_train_fp16_with_a_scaler_and_new_ones_bf16(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    t4 = pick_device("cuda")
    assert t4 == torch.device("cuda", 0)
    plan = plan_for(t4)
    assert plan.precision == "fp16" and plan.uses_scaler and "7.5" in plan.reason  # not emulated bf16
    with pytest.raises(DeepLenseError, match="only emulates bf16"):
        plan_for(t4, "bf16")
    a100 = pick_device("cuda:1")  # on a mixed machine: the capability of the card actually used
    assert cuda.set_calls[-1] == 1 and cuda.current == 1
    plan = plan_for(a100)
    assert plan.precision == "bf16" and not plan.uses_scaler
    assert plan_for(a100, "fp32").autocast_dtype is None
    with pytest.raises(DeepLenseError, match=r"this machine has 2 CUDA device\(s\) \(cuda:0 \.\. cuda:1\)"):
        pick_device("cuda:2")


def test_a_cuda_ordinal_that_does_not_exist_is_one_line_exit_2(monkeypatch, small, tmp_path, capsys):
    FakeCuda(monkeypatch)
    assert main(["train", "--data", str(small), "--out", str(tmp_path / "run"), "--device", "cuda:5",
                 "--weights", "none", "--epochs", "1", "--image-size", "32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --device cuda:5: this machine has 2 CUDA device(s)")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_fp16_scaler_branch_trains_and_is_saved(monkeypatch, small, tmp_path):
    """The fp16 + GradScaler path (old GPUs) runs end to end, here on the CPU's fp16 autocast: the scaler is
    the plan's, it scales the loss, and the checkpoint keeps its state for a resume."""
    import deeplense.train as train_mod

    rec = _epoch(Plan(torch.device("cpu"), "fp16", emulate="cuda"), TrainConfig(image_size=32, batch_size=4,
                                                                               warmup_epochs=0.0))
    assert np.isfinite(rec["train_loss"])
    monkeypatch.setattr(train_mod, "plan_for", lambda dev, precision: Plan(torch.device(dev), "fp16", "forced"))
    s = train_mod.train(recipe("default", epochs=1, **FAST), small, tmp_path / "run", **quiet())
    assert s["precision"] == "fp16"
    scaler = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["scaler"]
    assert scaler.get("scale", 0) > 1  # an enabled scaler's state; a disabled one saves {}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["execution"]["precision"] == "fp16"


def test_gpu_present_but_unusable_is_said_not_silent(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_mod.shutil, "which", lambda n: "/usr/bin/nvidia-smi" if n == "nvidia-smi" else None)
    monkeypatch.setattr(device_mod.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 0, stdout="Tesla T4, 535.104.05\n", stderr=""))
    said = []
    assert pick_device(None, warn=said.append) == torch.device("cpu")
    assert len(said) == 1 and "Tesla T4" in said[0] and "cannot use it" in said[0] and "README" in said[0]
    with pytest.raises(DeepLenseError, match="CUDA is not available.*Tesla T4"):
        pick_device("cuda")
    monkeypatch.setattr(device_mod.shutil, "which", lambda name: None)  # no GPU at all: nothing to say
    said.clear()
    assert pick_device(None, warn=said.append) == torch.device("cpu") and not said


def test_cpu_bf16_only_where_native(monkeypatch):
    monkeypatch.setattr(device_mod, "cpu_native_bf16", lambda: False)
    assert plan_for("cpu").precision == "fp32"
    with pytest.raises(DeepLenseError, match="no native bf16"):
        plan_for("cpu", "bf16")
    with pytest.raises(DeepLenseError, match="needs a CUDA GPU"):
        plan_for("cpu", "fp16")
    monkeypatch.setattr(device_mod, "cpu_native_bf16", lambda: True)
    assert plan_for("cpu", "bf16").autocast_dtype == torch.bfloat16
    assert plan_for("cpu").precision == "bf16"  # auto: native bf16 kept the held-out AUC in the paired study
    assert plan_for("cpu", "fp32").precision == "fp32"  # and fp32 stays one option away


@pytest.mark.slow
def test_cpu_bf16_is_repeatable(small, tmp_path, monkeypatch):
    """Two bf16 runs on the CPU give the same weights bit for bit (as fp32 runs do)."""
    import deeplense.train as train_mod

    monkeypatch.setattr(train_mod, "plan_for", lambda dev, precision: Plan(torch.device(dev), "bf16", "forced"))
    cfg = recipe("default", epochs=1, **FAST, precision="bf16")
    for k in (1, 2):
        train_mod.train(cfg, small, tmp_path / f"r{k}", **quiet())
    a, b = (torch.load(tmp_path / f"r{k}" / "last.pt", weights_only=True)["model"] for k in (1, 2))
    assert all(torch.equal(a[n], b[n]) for n in a)


# ---------------------------------------------------------------------------------------------- memory
def test_memory_plan_fits_data_training_and_validation_together():
    """8-24 GB cards with the full-scale set resident (3.3 GB) and efficientnet_b3: what the plan keeps on the
    device and its validation batch fit together; the old rule (data resident if under half the free memory,
    validation at 1024) did not."""
    n_params = 12_000_000
    train_per, eval_per = device_mod.activation_bytes("efficientnet_b3", 224)
    for gb in (8, 12, 16, 24, 80):
        free = int(gb * 1e9)
        m = memory_plan("efficientnet_b3", 224, 64, n_params, int(3.3e9), free)
        resident_bytes = m.data if m.resident else 0
        assert resident_bytes + m.model + max(m.train_peak, m.eval_peak) <= 0.8 * free, (gb, m)
        assert m.eval_peak == m.eval_batch_size * eval_per and 16 <= m.eval_batch_size <= 1024
        assert m.eval_batch_size & (m.eval_batch_size - 1) == 0
    old_rule = 3.3e9 + 1024 * eval_per  # what the old code would hold at the first validation on an 8 GB card
    assert old_rule > 8e9
    assert memory_plan("efficientnet_b3", 224, 64, n_params, int(3.3e9), int(80e9)).eval_batch_size == 1024
    assert memory_plan("resnet34", 224, 64, n_params, int(3.3e9), int(8e9), eval_batch_size=64).eval_batch_size == 64


def test_free_memory_counts_what_pytorch_holds_unused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (2_000_000_000, 8_000_000_000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 3_000_000_000)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 1_000_000_000)
    assert free_memory(torch.device("cuda", 0)) == 4_000_000_000


class FakeEvent:
    log: list = []

    def record(self):
        FakeEvent.log.append(("record", id(self)))

    def synchronize(self):
        FakeEvent.log.append(("synchronize", id(self)))


def test_data_that_does_not_fit_is_staged_through_pinned_buffers(monkeypatch):
    """The CUDA branch of place_data with too little memory: the images stay in host memory, each batch is
    gathered into one of two pinned buffers and copied non-blocking, and a buffer is refilled only after its
    previous copy finished."""
    x, y = _tiny(n=40)
    cfg = TrainConfig(image_size=224, batch_size=8, eval_batch_size=None)
    monkeypatch.setattr(engine, "free_memory", lambda dev: 10_000_000)  # 10 MB "free": nothing fits
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self.shape) or self)
    monkeypatch.setattr(engine, "new_event", FakeEvent)
    FakeEvent.log = []
    placed = engine.place_data(x, y, x[:8], Plan(torch.device("cpu"), "bf16", emulate="cuda"), cfg, 1_000)
    assert not placed.resident and isinstance(placed.memory, MemoryPlan) and placed.eval_batch_size == 16
    got = []
    for b in range(4):
        idx = torch.arange(b * 8, (b + 1) * 8).flip(0)
        xb, yb = placed.batch(idx)
        assert torch.equal(xb, x[idx]) and torch.equal(yb, y[idx])
        # the copy starts from a pinned buffer (on the CPU, .to() returns the buffer itself)
        assert xb.data_ptr() == placed._buffers[b % 2].data_ptr()
        got.append(xb.clone())
    assert pinned == [torch.Size([8, 1, 40, 40])] * 2  # two pinned buffers, made once
    kinds = [k for k, _ in FakeEvent.log]
    assert kinds == ["record", "record", "synchronize", "record", "synchronize", "record"]
    first_event = FakeEvent.log[0][1]
    assert FakeEvent.log[2] == ("synchronize", first_event)  # batch 3 reuses batch 1's buffer after its copy


# ---------------------------------------------------------------------------------------------- evaluation batches
class Recorder(torch.nn.Module):
    """A network that records its batch sizes and runs out of memory above ``limit``."""

    def __init__(self, limit=None):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.limit, self.sizes = torch.nn.Linear(3, 3), limit, []

    def forward(self, x):
        self.sizes.append(len(x))
        if self.limit is not None and len(x) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.lin(x.mean(dim=(2, 3)))


def test_eval_batch_size_is_used_and_an_oom_halves_it_once():
    cfg = TrainConfig(image_size=16, eval_batch_size=3)
    x = torch.rand(10, 1, 16, 16)
    net = Recorder()
    plain = engine.predict_proba(net, x, cfg, torch.device("cpu"))
    assert net.sizes == [3, 3, 3, 1]
    said = []
    net = Recorder(limit=4)
    probs = engine.predict_proba(net, x, cfg.replace(eval_batch_size=8), torch.device("cpu"), log=said.append)
    np.testing.assert_allclose(probs, plain, atol=1e-6)
    assert net.sizes == [8, 4, 4, 2] and len(said) == 1 and "retrying at batch 4" in said[0]
    with pytest.raises(torch.OutOfMemoryError):  # once: a second out-of-memory error is not hidden
        engine.predict_proba(Recorder(limit=2), x, cfg.replace(eval_batch_size=8), torch.device("cpu"),
                             log=said.append)


@pytest.mark.slow
def test_eval_batch_size_from_the_command_line(small, tmp_path, monkeypatch):
    import deeplense.evaluate as evaluate_mod

    run = tmp_path / "run"
    assert main(["train", "--data", str(small), "--out", str(run), "--epochs", "1", "--image-size", "32",
                 "--batch-size", "8", "--weights", "none", "--device", "cpu", "--eval-batch-size", "7"]) == 0
    assert json.loads((run / "config.json").read_text())["config"]["eval_batch_size"] == 7
    seen = []
    real = evaluate_mod.predict_proba
    monkeypatch.setattr(evaluate_mod, "predict_proba",
                        lambda model, x, config, *a, **k: seen.append(config.eval_batch_size) or real(model, x, config,
                                                                                                    *a, **k))
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--out", str(tmp_path / "ev"), "--bootstrap", "0",
                 "--device", "cpu", "--eval-batch-size", "5", "--precision", "fp32"]) == 0
    assert seen == [5]


# ---------------------------------------------------------------------------------------------- torchrun
def test_torchrun_on_gpus_binds_each_rank_and_waits_long_enough(monkeypatch):
    import deeplense.train as train_mod

    FakeCuda(monkeypatch)
    calls = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **k: calls.append(k))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert train_mod.rank_device(None) == train_mod.rank_device("cuda") == "cuda:1"  # the CLI's early check too
    assert train_mod.rank_device("cpu") == "cpu"
    world, rank, dev = train_mod._start_processes(None)
    assert (world, rank, dev) == (2, 1, torch.device("cuda", 1)) and torch.cuda.current_device() == 1
    assert calls[0]["backend"] == "nccl" and calls[0]["device_id"] == torch.device("cuda", 1)
    assert calls[0]["timeout"] >= datetime.timedelta(minutes=30)  # NCCL's default 10 min is too short


def test_only_rank_0_validates(monkeypatch):
    import deeplense.train as train_mod

    called = []
    monkeypatch.setattr(engine, "validate", lambda *a, **k: called.append(1) or {"val_loss": 0.5})

    def broadcast(objects, src):
        assert src == 0
        objects[0] = {"val_loss": 0.25}  # what rank 0 sent

    monkeypatch.setattr(torch.distributed, "broadcast_object_list", broadcast)
    placed = engine.Placement(*_tiny(), torch.zeros(1), Plan(torch.device("cpu"), "fp32"), True)
    assert train_mod._validate_on_rank0(None, placed, None, TrainConfig(), rank=1, world=2) == {"val_loss": 0.25}
    assert not called
    assert train_mod._validate_on_rank0(None, placed, None, TrainConfig(), rank=0, world=2) == {"val_loss": 0.25}
    assert called == [1]
