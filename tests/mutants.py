"""Plant known faults one at a time in a temporary copy of the code and check that the tests catch each one.

``make mutants`` (or ``python tests/mutants.py``) copies the package, tests, benchmarks and notebook into a
temporary folder, checks that the chosen tests pass there unchanged (the baseline), then for each fault below
applies its source edit, runs only the tests that should catch it, and prints one line per fault:

    KILLED    best_pt_every_epoch          (12 s) by tests/test_train.py::test_best_checkpoint_...
    SURVIVED  ...                          the tests passed with the fault planted: a hole in the suite

and ``mutants: K of N killed`` last. Exit status 0 only when every fault is killed. Not part of CI (it takes
minutes). When a bug is found, add its fault here with the test that now catches it, so the list grows.

An edit whose source text is no longer in the file (the code moved) is reported as STALE, not killed: update
the snippet with the code.
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
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPY = ("Common_Task", "tests", "benchmarks", "experiments", "pyproject.toml", "README.md", "docs")


@dataclass(frozen=True)
class Mutant:
    name: str
    fault: str  # what a user would suffer
    file: str
    old: str  # exact text, present exactly once
    new: str
    tests: tuple[str, ...]


PKG = "Common_Task/deeplense/"
TRAIN, ENGINE, EVALUATE, METRICS = PKG + "train.py", PKG + "engine.py", PKG + "evaluate.py", PKG + "metrics.py"
DEVICE = PKG + "device.py"
NOTEBOOK_PY = PKG + "notebook.py"
DEV_TESTS = "tests/test_device.py::"
NOTEBOOK = "Common_Task/DeepLense_Classification.ipynb"

MUTANTS = (
    Mutant("best_pt_every_epoch", "best.pt is overwritten every epoch: the last epoch is evaluated, not the best",
           TRAIN, '                if improved:\n                    save_checkpoint(run / "best.pt", payload)\n',
           '                save_checkpoint(run / "best.pt", payload)\n',
           ("tests/test_train.py::test_best_checkpoint_holds_the_peak_epoch_also_across_resume",)),
    Mutant("resume_resets_best", "a resumed run forgets its best metric and overwrites best.pt with a worse epoch",
           PKG + "checkpoint.py", 'ckpt["epoch"] + 1, ckpt["best_metric"], ckpt["best_epoch"]',
           'ckpt["epoch"] + 1, float("-inf"), 0',
           ("tests/test_train.py::test_best_checkpoint_holds_the_peak_epoch_also_across_resume",)),
    Mutant("selection_includes_test", "the reference protocol selects on all of val, its held-out part included",
           PKG + "splits.py", 'dtype=np.int64), "val", sel, test)\n    if protocol',
           'dtype=np.int64), "val", np.arange(len(val_labels)), test)\n    if protocol',
           ("tests/test_evaluate.py::test_selection_and_heldout_test_share_no_image",)),
    Mutant("test_not_the_recorded_one", "evaluate draws its own held-out part instead of the one training kept out",
           EVALUATE, '        return rec.test_idx, checked, description',
           '        sel, test = split_holdout(labels, config.holdout_fraction, seed=config.seed + 1)\n'
           '        return test, checked, description',
           ("tests/test_evaluate.py::test_selection_and_heldout_test_share_no_image",)),
    Mutant("changed_val_unchecked", "evaluate on a val with extra files reports on images used for selection",
           EVALUATE, '    if recorded.get("listings", {}).get(source) != listing:\n', "    if False:\n",
           ("tests/test_evaluate.py::test_a_changed_val_is_refused_not_silently_resplit",)),
    Mutant("changed_val_resumed", "a resume on a val with extra files selects on a shifted split",
           TRAIN, '        changed = [s for s in needed if recorded["listings"].get(s) != info[s].listing]\n',
           "        changed = []\n",
           ("tests/test_evaluate.py::test_a_changed_val_is_refused_not_silently_resplit",)),
    Mutant("clean_trains_on_selection", "the clean protocol trains on the images that select the checkpoint",
           PKG + "splits.py", 'return ProtocolSplit("clean", train, "train", sel, None)',
           'return ProtocolSplit("clean", np.arange(len(train_labels), dtype=np.int64), "train", sel, None)',
           ("tests/test_evaluate.py::test_clean_protocol_keeps_val_out_of_training_and_selection",)),
    Mutant("clean_reads_val", "training under the clean protocol reads val",
           TRAIN, '    needed = SPLITS if config.protocol == "reference" else ("train",)', "    needed = SPLITS",
           ("tests/test_evaluate.py::test_clean_protocol_keeps_val_out_of_training_and_selection",)),
    Mutant("onecycle_not_stepped", "the one-cycle schedule never moves from its starting learning rate",
           ENGINE, '        if config.schedule != "step":  # per-step schedules\n',
           '        if config.schedule == "cosine":\n',
           ("tests/test_engine.py::test_onecycle_and_label_smoothing_reach_training",)),
    Mutant("label_smoothing_ignored", "--label-smoothing is recorded but the loss ignores it",
           ENGINE, "label_smoothing=config.label_smoothing)", "label_smoothing=0.0)",
           ("tests/test_engine.py::test_onecycle_and_label_smoothing_reach_training",)),
    Mutant("predict_in_train_mode", "predictions made with the network in training mode (the reference's bug)",
           ENGINE, "    model.eval()\n    fn = input_fn(config)\n", "    fn = input_fn(config)\n",
           ("tests/test_engine.py::test_predictions_use_eval_mode",)),
    Mutant("tta_ignored_by_cli", "evaluate --tta is accepted and ignored",
           PKG + "cli.py", "split=args.split, tta=args.tta,", "split=args.split, tta=False,",
           ("tests/test_engine.py::test_tta_is_the_mean_over_the_8_symmetries",)),
    Mutant("tta_ignored_by_engine", "predict_proba(tta=True) averages one view only",
           PKG + "transforms.py",
           "    return symmetries(config.augmentation) if tta and config.arch not in INVARIANT_ARCHS else (0,)\n",
           "    return (0,)\n",
           ("tests/test_engine.py::test_tta_is_the_mean_over_the_8_symmetries",)),
    Mutant("bootstrap_constant", "every bootstrap interval is [0, 1]",
           METRICS, "        return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v else None\n",
           "        return [0.0, 1.0] if v else None\n",
           ("tests/test_metrics.py::test_bootstrap_interval_narrows_as_n_grows",
            "tests/test_metrics.py::test_bootstrap_intervals_contain_point_estimates_and_are_seeded")),
    Mutant("bootstrap_ignores_seed", "the bootstrap resamples do not depend on the seed",
           METRICS, "    rng = np.random.default_rng(seed)\n    samples =",
           "    rng = np.random.default_rng(0)\n    samples =",
           ("tests/test_metrics.py::test_bootstrap_intervals_contain_point_estimates_and_are_seeded",)),
    Mutant("macro_interval_from_micro", "the macro-AUC interval is built from micro AUCs",
           METRICS, '        samples["macro_auc"].append(float(np.mean(per_class)))\n',
           '        samples["macro_auc"].append(micro)\n',
           ("tests/test_metrics.py::test_macro_interval_is_built_from_per_class_aucs",)),
    Mutant("training_skips_augmentation", "the training loop never calls the augmentation",
           ENGINE, "    xb = augment(xb, config.augmentation, draws=draws)\n", "",
           ("tests/test_engine.py::test_training_batches_are_d4_augmented",)),
    Mutant("pixel_range_unchecked", "raw counts (0-255) are silently clipped to [0, 1] instead of refused",
           PKG + "data.py", "    if lo < -1e-6 or hi > 1 + 1e-6:\n", "    if False:\n",
           ("tests/test_data.py::test_bad_input_one_line_error_exit_2_nothing_written[out_of_range]",)),
    Mutant("listing_unsorted", "files are taken in directory order: the held-out split depends on the filesystem",
           PKG + "data.py", "        ordered = sorted(names, key=_name_key)\n", "        ordered = list(names)\n",
           ("tests/test_splits.py::test_heldout_files_do_not_depend_on_directory_order",)),
    Mutant("no_sky_noise", "the simulator forgets the Gaussian sky noise",
           PKG + "simulate.py",
           "    img = img + rng.normal(0.0, config.background_rms if background_rms is None else background_rms, "
           "model.shape)\n", "    img = img + 0.0\n",
           ("tests/test_simulate.py::test_sky_noise_has_the_configured_rms",)),
    Mutant("sim_seed_ignored_vort", "vort images are the same whatever the seed",
           PKG + "simulate.py", "SeedSequence([int(seed), SPLITS.index(split)",
           'SeedSequence([int(seed) if cls != "vort" else 0, SPLITS.index(split)',
           ("tests/test_simulate.py::test_images_are_normalised_float32_and_deterministic",)),
    Mutant("sim_seed_ignored_no", "no-substructure images are the same whatever the seed",
           PKG + "simulate.py", "SeedSequence([int(seed), SPLITS.index(split)",
           'SeedSequence([int(seed) if cls != "no" else 0, SPLITS.index(split)',
           ("tests/test_simulate.py::test_images_are_normalised_float32_and_deterministic",)),
    Mutant("checkpoint_unpickled", "checkpoints are loaded with weights_only=False: a checkpoint can run code",
           PKG + "checkpoint.py", "torch.load(path, map_location=map_location, weights_only=True)",
           "torch.load(path, map_location=map_location, weights_only=False)",
           ("tests/test_checkpoint.py::test_checkpoint_with_code_is_refused_without_running_it",)),
    Mutant("weights_file_unpickled", "a weights file is loaded with weights_only=False: it can run code",
           PKG + "model.py", 'torch.load(path, map_location="cpu", weights_only=True)',
           'torch.load(path, map_location="cpu", weights_only=False)',
           ("tests/test_model.py::test_pickled_code_is_refused_and_never_run",)),
    Mutant("ddp_same_shard", "every DDP rank trains on the same shard of the epoch",
           ENGINE, "generator=gen)[rank * per_rank : (rank + 1) * per_rank]", "generator=gen)[:per_rank]",
           ("tests/test_train.py::test_ddp_two_gloo_processes",)),
    Mutant("config_drops_none", "recipe('reference', resize_then_crop=None) silently keeps 256",
           PKG + "config.py", "        return replace(self, **changes)\n",
           "        return replace(self, **{k: v for k, v in changes.items() if v is not None})\n",
           ("tests/test_config.py::test_none_sets_optional_fields_and_is_refused_elsewhere",)),
    Mutant("arch_ignored_on_rebuild", "evaluate and predict rebuild a ResNet34 whatever network was trained",
           PKG + "checkpoint.py",
           '    model, _ = build_model("none", arch=arch, ', '    model, _ = build_model("none", ',
           ("tests/test_train.py::test_every_arch_trains_resumes_evaluates_predicts_and_explains",)),
    Mutant("lensnet_fed_three_channels", "lensnet is fed the 3-channel ImageNet input",
           PKG + "transforms.py", "channels=config.in_channels)", "channels=3)",
           ("tests/test_train.py::test_every_arch_trains_resumes_evaluates_predicts_and_explains",)),
    Mutant("sigterm_ignored", "SIGTERM (timeout, docker stop, a queue's limit) leaves half-written files",
           PKG + "cli.py", "        previous = {sig: signal.signal(sig, _on_signal) for sig in handled}\n",
           "        previous = {}\n",
           ("tests/test_cli.py::test_sigterm_cleans_up_like_ctrl_c",)),
    Mutant("os_error_traceback", "an OSError (full disk, a path that is a file) ends in a traceback",
           PKG + "cli.py", "    except OSError as exc:  # a full disk",
           "    except ZeroDivisionError as exc:  # a full disk",
           ("tests/test_cli.py::test_no_traceback_for_os_errors_raised_deep_inside",)),
    Mutant("cache_space_unchecked", "a cache build into a full disk dies with SIGBUS instead of one line",
           PKG + "data.py", "        _check_space(sum(len(listed[s]) * firsts[s].size * 4 for s in firsts))\n", "",
           ("tests/test_data.py::test_full_disk_is_one_line_and_leaves_nothing",)),
    Mutant("stale_cache_after_cp_p", "a file changed with its size and mtime kept is served from the stale cache",
           PKG + "data.py", "\\t{st.st_mtime_ns}\\t{st.st_ctime_ns}\\n", "\\t{st.st_mtime_ns}\\n",
           ("tests/test_data.py::test_a_file_changed_with_size_and_mtime_preserved_is_noticed",)),
    Mutant("dangling_link_skipped", "a dangling symbolic link in a class folder is skipped without a word",
           PKG + "data.py", "        if dangling:\n", "        if False:\n",
           ("tests/test_data.py::test_dangling_link_and_stray_copy_are_named",)),
    Mutant("resume_keeps_temp_files", "a resume leaves the killed process's half-written checkpoints",
           TRAIN, "        sweep_stale_temps(run, all_of_them=True)", "        pass",
           ("tests/test_train.py::test_resume_recovers_a_lost_history_line_and_sweeps_temp_files",)),
    Mutant("history_line_lost", "a kill between the checkpoint and the history write loses an epoch's record",
           TRAIN, '        history.append(ckpt["metrics"])', "        pass",
           ("tests/test_train.py::test_resume_recovers_a_lost_history_line_and_sweeps_temp_files",)),
    Mutant("benchmark_draws_ignored", "the benchmark preset draws a lens per image but renders the fixed one",
           PKG + "simulate.py", '"e1": p.value("lens_e1", c),', '"e1": c.lens_e1,',
           ("tests/test_simulate.py::test_benchmark_preset_draws_each_setting_in_its_range",)),
    Mutant("notebook_hardcoded_table", "the notebook shows a typed results table instead of the run's numbers",
           NOTEBOOK, "display(Markdown(report.results_table(METRICS)))",
           "display(Markdown('| accuracy | 0.927 [0.887, 0.967] |'))",
           ("tests/test_notebook.py::test_notebook_executes_and_figures_are_stable",)),
    Mutant("notebook_tta_dropped", "the notebook's TTA = True never reaches the evaluation",
           PKG + "notebook.py", 'tta=given_or("TTA", True),', "tta=False,",
           ("tests/test_notebook.py::test_notebook_executes_and_figures_are_stable",)),
    Mutant("notebook_hardcoded_findings", "the notebook's reading of the curves is typed, not the run's",
           NOTEBOOK, "display(Markdown(report.findings(METRICS)))",
           "display(Markdown('Hardest class in this run: **subhalos** (`sphere`): AUC 0.927'))",
           ("tests/test_notebook.py::test_notebook_executes_and_figures_are_stable",)),
    # issue 21: devices we do not have, forced on the CPU
    Mutant("mps_float64_sum", "every Mac crashes in the first epoch: the loss is summed in float64, which MPS lacks",
           DEVICE, 'return torch.float32 if self.kind == "mps" else torch.float64', "return torch.float64",
           (DEV_TESTS + "test_mps_epoch_needs_no_float64_and_copies_blocking",)),
    Mutant("mps_non_blocking", "non-blocking copies to MPS from freed temporaries (silent corruption)",
           DEVICE, '(see the module docstring for MPS)."""\n        return self.kind == "cuda"',
           '(see the module docstring for MPS)."""\n        return True',
           (DEV_TESTS + "test_mps_epoch_needs_no_float64_and_copies_blocking",)),
    Mutant("emulated_bf16", "T4/V100/Colab train in emulated bf16 instead of fp16 with a gradient scaler",
           DEVICE, "torch.cuda.is_bf16_supported(including_emulation=False)", "torch.cuda.is_bf16_supported()",
           (DEV_TESTS + "test_old_gpus_train_fp16_with_a_scaler_and_new_ones_bf16",)),
    Mutant("set_device_skipped", "--device cuda:1 asks cuda:0 what precision it can do",
           DEVICE, "            torch.cuda.set_device(dev)\n            return dev\n", "            return dev\n",
           (DEV_TESTS + "test_old_gpus_train_fp16_with_a_scaler_and_new_ones_bf16",)),
    Mutant("cuda_ordinal_unchecked", "--device cuda:5 on a 2-GPU machine ends in a traceback",
           DEVICE, "if dev.index is not None and not 0 <= dev.index < count:", "if False:",
           (DEV_TESTS + "test_a_cuda_ordinal_that_does_not_exist_is_one_line_exit_2",)),
    Mutant("scaler_not_from_plan", "the fp16 branch trains without its gradient scaler",
           TRAIN, "    scaler = plan.grad_scaler()\n", '    scaler = torch.amp.GradScaler("cuda", enabled=False)\n',
           (DEV_TESTS + "test_fp16_scaler_branch_trains_and_is_saved",)),
    Mutant("gpu_unusable_silent", "a GPU torch cannot use is ignored: training runs on the CPU without a word",
           DEVICE, '        (warn or _warn_once)(f"warning: {why}")\n', "        pass\n",
           (DEV_TESTS + "test_gpu_present_but_unusable_is_said_not_silent",)),
    Mutant("cpu_bf16_emulated", "--precision bf16 on a CPU without native bf16 trains 20x slower without a word",
           DEVICE, "        if not cpu_native_bf16():\n", "        if False:\n",
           (DEV_TESTS + "test_cpu_bf16_only_where_native",)),
    Mutant("cpu_auto_ignores_native_bf16", "auto stays fp32 on a CPU with native bf16: 1.6-1.8x slower training",
           DEVICE, "    if cpu_native_bf16():\n        return Plan(dev, \"bf16\"",
           "    if False:\n        return Plan(dev, \"bf16\"", (DEV_TESTS + "test_cpu_bf16_only_where_native",)),
    Mutant("memory_budgets_apart", "data residency ignores the validation batch: 8-12 GB cards run out of memory",
           DEVICE, "    resident = room_resident >= train_peak and room_resident >= want * eval_per\n",
           "    resident = data_bytes < 0.5 * free_bytes\n",
           (DEV_TESTS + "test_memory_plan_fits_data_training_and_validation_together",)),
    Mutant("reserved_not_free", "memory PyTorch holds unused is counted as taken",
           DEVICE, "free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)", "free",
           (DEV_TESTS + "test_free_memory_counts_what_pytorch_holds_unused",)),
    Mutant("pinned_buffer_raced", "a pinned buffer is refilled while its previous copy may still be running",
           ENGINE, "            self._events[k].synchronize()", "            pass",
           (DEV_TESTS + "test_data_that_does_not_fit_is_staged_through_pinned_buffers",)),
    Mutant("pinned_claim_false", "the host-memory fallback copies from pageable memory (not asynchronous)",
           ENGINE, "        torch.index_select(self.x_train, 0, idx, out=buf)\n        xb = buf.to(",
           "        xb = self.x_train[idx].to(",
           (DEV_TESTS + "test_data_that_does_not_fit_is_staged_through_pinned_buffers",)),
    Mutant("oom_not_retried", "validation dies on the first out-of-memory error instead of halving its batch",
           ENGINE, "            if retried or bs < 2 or not is_out_of_memory(exc):", "            if True:",
           (DEV_TESTS + "test_eval_batch_size_is_used_and_an_oom_halves_it_once",)),
    Mutant("eval_batch_ignored", "--eval-batch-size is recorded but validation and prediction ignore it",
           ENGINE, "    bs = batch_size or config.eval_batch_size or default_eval_batch_size(plan)",
           "    bs = batch_size or default_eval_batch_size(plan)",
           (DEV_TESTS + "test_eval_batch_size_is_used_and_an_oom_halves_it_once",)),
    Mutant("no_device_id", "NCCL is started without the rank's GPU (device_id) and with its 10-minute timeout",
           TRAIN, 'dist.init_process_group(backend="nccl", timeout=timeout, device_id=dev)',
           'dist.init_process_group(backend="nccl")',
           (DEV_TESTS + "test_torchrun_on_gpus_binds_each_rank_and_waits_long_enough",)),
    Mutant("every_rank_validates", "under torchrun every rank validates the whole selection set",
           TRAIN, "           if rank == 0 else None]", "           ]",
           (DEV_TESTS + "test_only_rank_0_validates",)),
    Mutant("done_line_per_rank", "under torchrun every rank prints its own done: line, with different numbers",
           PKG + "cli.py", '    if summary.get("rank", 0) == 0:', "    if True:",
           ("tests/test_train.py::test_ddp_two_gloo_processes",)),
    Mutant("doctor_weights_unchecked", "doctor says all is well when training would start from random weights",
           PKG + "doctor.py", "    if cached.is_file():\n", "    if True:\n",
           ("tests/test_doctor.py::test_each_problem_is_one_line_and_exit_2",)),
    Mutant("doctor_disk_unchecked", "doctor misses a disk too small for the dataset cache",
           PKG + "doctor.py", "    if need_cache and free_disk < need_cache * 1.02:\n", "    if False:\n",
           ("tests/test_doctor.py::test_each_problem_is_one_line_and_exit_2",)),
    Mutant("doctor_step_errors_hidden", "doctor hides a training step that fails on the device",
           PKG + "doctor.py", "        if err:\n", "        if False:\n",
           ("tests/test_doctor.py::test_each_problem_is_one_line_and_exit_2",)),
    Mutant("bench_gpu_times_a_copy", "make bench-gpu times a hand-copied training step, not the engine's",
           "benchmarks/bench_gpu.py", "        engine.train_step(net, opt, scaler, xb, yb, cfg, plan, draws[b])\n",
           "        loss = torch.nn.functional.cross_entropy(net(xb.expand(-1, 3, -1, -1)).float(), yb)\n"
           "        opt.zero_grad()\n        loss.backward()\n        opt.step()\n",
           ("tests/test_bench_gpu.py::test_the_gpu_benchmark_times_the_engines_own_step",)),
    # issue 22, item 1: held-out numbers that were trained or selected on
    Mutant("val_same_folder_unchecked", "a val/ that is a link to train/ passes: the held-out test is training data",
           PKG + "splits.py", "    if a.resolve() == b.resolve():\n", "    if False:\n",
           ("tests/test_evaluate.py::test_a_val_that_is_train_is_refused",)),
    Mutant("val_hard_links_unchecked", "val/ files hard-linked to train/ files pass the held-out check",
           PKG + "splits.py", "        if twin is not None:\n", "        if False:\n",
           ("tests/test_evaluate.py::test_a_val_that_is_train_is_refused",)),
    Mutant("val_copies_unchecked", "copies of training images in val/ pass the held-out check",
           PKG + "splits.py", "            if np.array_equal(train_images[i], val_images[j]):\n",
           "            if False:\n",
           ("tests/test_evaluate.py::test_a_val_that_is_train_is_refused",)),
    Mutant("train_disjointness_skipped", "training under the reference protocol never checks val/ against train/",
           TRAIN, '        check_disjoint(info["train"], info["val"], tr_images, va_images)\n', "        pass\n",
           ("tests/test_evaluate.py::test_a_val_that_is_train_is_refused",)),
    Mutant("clean_train_listing_unchecked", "a clean-protocol evaluation accepts a train/ other than the one used",
           EVALUATE, '        if recorded.get("listings", {}).get("train") not in (None, info["train"].listing):',
           "        if False:",
           ("tests/test_evaluate.py::test_clean_protocol_evaluation_checks_the_train_listing",)),
    Mutant("renamed_files_unchecked", "files renamed within a class move selection images into the held-out test",
           EVALUATE, "        if digest is not None and pixel_digest(images, idx) != digest:", "        if False:",
           ("tests/test_evaluate.py::test_files_renamed_within_a_class_are_caught_by_their_pixels",)),
    Mutant("sighup_ignored", "closing the terminal (SIGHUP) leaves half-written files behind",
           PKG + "cli.py", '    handled = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])\n',
           "    handled = [signal.SIGTERM]\n",
           ("tests/test_cli.py::test_sigterm_cleans_up_like_ctrl_c",)),
    Mutant("new_run_keeps_dead_temps", "a killed run's hidden checkpoint temp file stays forever beside a new run",
           TRAIN, "        sweep_stale_temps(run)  # half-written", "        pass  # half-written",
           ("tests/test_cli.py::test_a_new_run_sweeps_dead_writers_temp_files_and_says_how_to_resume",)),
    Mutant("special_file_replaced", "predict --output /dev/null (as root) replaces the system's /dev/null",
           PKG + "util.py", "    if final.exists() and not final.is_file() and not final.is_dir():\n",
           "    if False:\n",
           ("tests/test_evaluate.py::test_predict_output_writes_into_special_files_and_through_links",)),
    Mutant("symlink_replaced", "an output that is a symbolic link is replaced by a regular file",
           PKG + "util.py", "    if final.is_symlink():\n        final = Path(os.path.realpath(final))\n", "",
           ("tests/test_evaluate.py::test_predict_output_writes_into_special_files_and_through_links",)),
    Mutant("divergence_unnoticed", "a NaN loss trains on silently and saves NaN weights as the run's result",
           TRAIN, '    if not math.isfinite(rec["train_loss"]):', "    if False:",
           ("tests/test_cli.py::test_a_diverged_run_is_one_line",)),
    Mutant("batch_of_one_accepted", "--batch-size 1 trains on one image per BatchNorm step (a traceback at 32 px)",
           PKG + "config.py", 'valid=at_least(2, why=" (BatchNorm', 'valid=at_least(1, why=" (BatchNorm',
           ("tests/test_config.py::test_nonsense_is_refused_before_any_work",)),
    Mutant("device_checked_late", "a mistyped --device is found only after simulating a dataset",
           PKG + "cli.py", "        plan_for(pick_device(rank_device(args.device)), cfg.precision)  # so are",
           "        None  # so are",
           ("tests/test_cli.py::test_arguments_are_checked_before_any_work",)),
    Mutant("accuracy_ci_drops_resamples", "with 1 held-out image per class the accuracy interval is [x, x]",
           METRICS,
           '        samples["accuracy"].append(float((pred[idx] == yb).mean()))  # defined for every resample\n'
           '        if np.bincount(yb, minlength=k).min() == 0:\n            skipped += 1\n            continue\n',
           '        if np.bincount(yb, minlength=k).min() == 0:\n            skipped += 1\n            continue\n'
           '        samples["accuracy"].append(float((pred[idx] == yb).mean()))\n',
           ("tests/test_metrics.py::test_no_zero_width_intervals_from_tiny_test_sets",)),
    Mutant("auc_interval_from_too_few", "AUC intervals from 1-4 images per class are printed as 95% intervals",
           METRICS, "        if counts.min() < MIN_PER_CLASS_FOR_AUC_CI:\n", "        if False:\n",
           ("tests/test_metrics.py::test_no_zero_width_intervals_from_tiny_test_sets",)),
    Mutant("run_folder_unlocked", "two train jobs on one --out both succeed and interleave their files",
           TRAIN, '    with folder_lock(run, "a training run") if rank == 0 else contextlib.nullcontext():',
           "    with contextlib.nullcontext():",
           ("tests/test_train.py::test_one_writer_per_run_folder_and_no_run_over_results",)),
    Mutant("eval_folder_unlocked", "an evaluate writes into a folder another process is writing",
           EVALUATE, '    with folder_lock(out, "an evaluation"):', "    if True:",
           ("tests/test_train.py::test_one_writer_per_run_folder_and_no_run_over_results",)),
    Mutant("run_over_results", "train --out on a finished run whose last.pt was deleted overwrites its best.pt",
           TRAIN, "    if results := _results_in(run):", "    if results := []:",
           ("tests/test_train.py::test_one_writer_per_run_folder_and_no_run_over_results",)),
    Mutant("report_pair_unchecked", "report draws predictions from another evaluation beside metrics.json",
           PKG + "report.py", "    if recorded is not None and recorded != file_sha256(ppath):", "    if False:",
           ("tests/test_report.py::test_report_refuses_predictions_from_another_evaluation",)),
    Mutant("demo_out_checked_late", "a demo whose --out cannot be written fails only after redrawing the figures",
           PKG + "cli.py", "    _check_writable(out_dir)  # before the run", "    pass  # before the run",
           ("tests/test_notebook.py::test_demo_checks_out_first_and_no_readme_touches_nothing_of_the_repo",)),
    Mutant("no_readme_draws_over_images", "demo --no-readme still overwrites images/ and the committed notebook",
           PKG + "cli.py", "    if args.no_readme:  # leave the README", "    if False:  # leave the README",
           ("tests/test_notebook.py::test_demo_checks_out_first_and_no_readme_touches_nothing_of_the_repo",)),
    Mutant("notebook_error_dumped", "an error in a notebook cell is a 70-line kernel traceback",
           NOTEBOOK_PY, "    except CellExecutionError as exc:  # one line",
           "    except ZeroDivisionError as exc:  # one line",
           ("tests/test_notebook.py::test_a_failing_cell_is_one_line",)),
    Mutant("extra_class_folder_dropped", "a fourth class folder is left out of the dataset without a word",
           PKG + "data.py", "    if extra:\n", "    if False:\n",
           ("tests/test_data.py::test_quiet_surprises_are_named",)),
    Mutant("twin_numbers_counted", "01.npy beside 1.npy counts one image twice",
           PKG + "data.py", "        if twins:\n", "        if False:\n",
           ("tests/test_data.py::test_quiet_surprises_are_named",)),
    Mutant("crop_larger_ignored", "--crop larger than the images is ignored but recorded",
           PKG + "transforms.py", "    if crop is not None and crop > images.shape[-1]:\n", "    if False:\n",
           ("tests/test_data.py::test_quiet_surprises_are_named",)),
    Mutant("selection_ignores_limit", "evaluate --split selection reports on more images than chose the checkpoint",
           EVALUATE, "    return limit_per_class(labels, rec.selection_idx, config.limit_per_class), checked,",
           "    return rec.selection_idx, checked,",
           ("tests/test_evaluate.py::test_selection_after_limit_and_predict_of_another_size",)),
    Mutant("predict_size_unchecked", "predict classifies images of another size than the model was trained on",
           EVALUATE, "            if trained and tuple(trained) != tuple(shape):", "            if False:",
           ("tests/test_evaluate.py::test_selection_after_limit_and_predict_of_another_size",)),
    Mutant("simulate_over_real_images", "simulate into a folder of real images records them as simulated",
           PKG + "simulate.py", "        if found is not None:\n", "        if False:\n",
           ("tests/test_simulate.py::test_simulate_refuses_a_folder_of_images_it_did_not_write",)),
    Mutant("metrics_shape_unchecked", "report on a metrics.json of the wrong shape ends in a traceback",
           PKG + "report.py", "    if not (isinstance(cm, list) and len(cm) == k",
           "    if False and not (isinstance(cm, list) and len(cm) == k",
           ("tests/test_report.py::test_a_metrics_json_of_the_wrong_shape_is_one_line",)),
    Mutant("symlink_loop_is_no_such_folder", "--data on a symbolic link loop says 'no such folder'",
           PKG + "data.py", "        if start.is_symlink():\n", "        if False:\n",
           ("tests/test_data.py::test_a_symlink_loop_is_named_as_one",)),
    # issue 23: realism
    Mutant("read_noise_dropped", "the realistic preset's sky has no read-out noise",
           PKG + "simulate.py", "sky_count_distribution(sky * t, config.read_noise_counts)",
           "sky_count_distribution(sky * t, 0.0)",
           ("tests/test_simulate.py::test_counts_noise_is_poisson_on_the_sky_plus_read_noise",)),
    Mutant("sky_counts_unshifted", "the sky counts are the table's indices, not its values (read-out noise offset)",
           PKG + "simulate.py", "background = values[DiscreteGuideTable(p, random_state=rng).rvs(model.shape)]",
           "background = DiscreteGuideTable(p, random_state=rng).rvs(model.shape)",
           ("tests/test_simulate.py::test_counts_noise_is_poisson_on_the_sky_plus_read_noise",)),
    Mutant("light_without_photon_noise", "the lensed light is added without its own photon noise",
           PKG + "simulate.py", "light = rng.poisson(np.clip(model, 0, None) * t)",
           "light = np.rint(np.clip(model, 0, None) * t)",
           ("tests/test_simulate.py::test_counts_noise_is_poisson_on_the_sky_plus_read_noise",)),
    Mutant("lens_axis_ignored", "the realistic shear and source point anywhere instead of along x",
           PKG + "simulate.py", "        phi = np.radians(axis_deg + scatter_deg * rng.standard_normal())",
           "        phi = rng.uniform(0, np.pi)",
           ("tests/test_simulate.py::test_realistic_draws_each_setting_in_its_range_along_one_axis",)),
    Mutant("file_dtype_ignored", "the realistic preset writes float32 files, not float64 as the real ones",
           PKG + "simulate.py", 'index, dtype=np.dtype(_JOB["config"].file_dtype))', "index)",
           ("tests/test_simulate.py::test_realistic_is_the_default_and_writes_integer_counts_as_float64",)),
    Mutant("old_settings_refused", "a folder simulated before the new settings existed cannot be resumed",
           PKG + "simulate.py", "    old_cfg = {**defaults, **(recorded.get(\"config\") or {})}",
           "    old_cfg = {**{k: None for k in defaults}, **(recorded.get(\"config\") or {})}",
           ("tests/test_simulate.py::test_a_folder_simulated_before_the_new_settings_existed_still_resumes",)),
    Mutant("benchmark_on_common_task", "the benchmark preset is built on the old common_task images",
           PKG + "simulate.py", 'return cls(preset="benchmark", **{**REALISTIC, **BENCHMARK_SUBSTRUCTURE})',
           'return cls(preset="benchmark", **BENCHMARK_SUBSTRUCTURE)',
           ("tests/test_simulate.py::test_benchmark_is_realistic_with_stronger_substructure",)),
    Mutant("source_distance_area_uniform", "the realistic source centre is uniform over the disc, not in distance",
           PKG + "simulate.py", "return rng.uniform(0, radius), rng.uniform(0, 2 * np.pi)",
           "return radius * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)",
           ("tests/test_simulate.py::test_realistic_source_distance_is_uniform_not_its_area",)),
    Mutant("source_axis_ignored", "the realistic source is elongated in any direction instead of along x",
           PKG + "simulate.py", '("source_e1", "source_e2"), _axis("source_axis_deg")',
           '("source_e1", "source_e2"), lambda rng, c, r: _axis_polar(rng, r, None, 0.0)',
           ("tests/test_simulate.py::test_realistic_draws_each_setting_in_its_range_along_one_axis",)),
    Mutant("lensfit_sky_kept", "the lens fit models the sky as lensed light",
           PKG + "lensfit.py", "    data = counts - sky\n", "    data = counts\n",
           ("tests/test_lensfit.py::test_the_fit_recovers_a_simulated_lens",)),
    Mutant("lensfit_counts_scale", "the lens fit reads counts with a fixed scale instead of the image's K",
           PKG + "lensfit.py", "    counts = np.rint(x * k)\n", "    counts = np.rint(x * 800)\n",
           ("tests/test_lensfit.py::test_counts_and_sky_undo_the_min_max_normalisation",)),
    Mutant("lens_fits_redone", "fit_real_lenses fits again the images an earlier run finished",
           "experiments/fit_real_lenses.py", '        if old.get("settings") == settings:\n', "        if False:\n",
           ("tests/test_lensfit.py::test_fit_real_lenses_writes_numbers_and_resumes",)),
    Mutant("preset_help_without_default", "simulate --help no longer says which preset is the default",
           PKG + "cli.py", 'return f"{text} (default {DEFAULT_PRESET})"', "return text",
           ("tests/test_cli.py::test_preset_help_names_every_preset_and_the_true_default",)),
    Mutant("train_option_dropped", "a TrainConfig field (augmentation) is no longer a train option",
           PKG + "cli.py", "        if name not in names:\n",
           '        if name not in names or name == "augmentation":\n',
           ("tests/test_cli.py::test_every_config_field_is_a_train_option_with_the_configs_choices",)),
    Mutant("config_choice_unchecked", "the config accepts any name for a named setting",
           PKG + "config.py", "        if allowed and value not in allowed:\n",
           "        if False:\n",
           ("tests/test_config.py",)),
    Mutant("scale_crop_ignored_for_lensnet", "lensnet's input ignores the scale's crop",
           PKG + "config.py", 'overrides.get("crop", scaled.get("crop", base.crop))',
           'overrides.get("crop", base.crop)',
           ("tests/test_config.py::test_a_scale_sets_the_geometry_and_lensnet_keeps_its_native_pixels",)),
    Mutant("predict_columns_swapped", "predict's CSV writes the probabilities under the wrong class names",
           PKG + "evaluate.py", '**{f"p_{c}": f"{float(v):.6f}" for c, v in zip(CLASSES, p, strict=True)}',
           '**{f"p_{c}": f"{float(v):.6f}" for c, v in zip(CLASSES, p[::-1], strict=True)}',
           ("tests/test_evaluate.py::test_predict_csv_says_what_evaluate_computed_for_each_file",)),
    Mutant("predict_rows_shifted", "predict writes each batch's rows against the wrong files",
           PKG + "evaluate.py", "for f, p in zip(chunk, probs, strict=True):",
           "for f, p in zip(chunk, np.roll(probs, 1, axis=0), strict=True):",
           ("tests/test_evaluate.py::test_predict_csv_says_what_evaluate_computed_for_each_file",)),
    Mutant("sweep_live_temps", "sweep_stale_temps removes a live writer's temporary file",
           PKG + "util.py", "(all_of_them or not _alive(int(m.group(1))))", "(all_of_them or True)",
           ("tests/test_util.py::test_sweep_removes_only_temporaries_of_dead_writers",)),
    Mutant("notebook_full_size_figures", "the notebook stores each figure at full size again",
           PKG + "notebook.py", "        if im.width > width:\n", "        if False:\n",
           ("tests/test_notebook.py::test_notebook_executes_and_figures_are_stable",)),
    Mutant("bench_missed_goal_hidden", "run_all's summary counts a missed benchmark goal as met",
           "benchmarks/run_all.py", 'for _, r in judged if not r["met"]]', "for _, r in judged if False]",
           ("tests/test_benchmarks.py::test_run_all_reads_the_results_and_ends_with_the_goals",)),
    Mutant("bench_goal_direction", "a benchmark goal '<= x' is judged as '>= x'",
           "benchmarks/common.py", '_OPS = {">=": operator.ge, "<=": operator.le,',
           '_OPS = {">=": operator.ge, "<=": operator.ge,',
           ("tests/test_benchmarks.py::test_goals_are_judged_from_the_numbers",)),
    Mutant("arch_auc_mixes_studies", "the arch table joins one network's AUCs from studies run on different CPUs",
           "benchmarks/bench_archs.py", "taken.setdefault(net[0], name) != name", "False",
           ("tests/test_benchmarks.py::test_arch_table_auc_reads_every_study_and_pairs_each_network_with_its_own_"
            "default",)),
    Mutant("evaluated_listing_unchecked", "report and explain show images other than the ones evaluated when the "
           "split changed after evaluate", EVALUATE,
           'if info[split].listing != data.get("listing") or not np.array_equal(all_labels[idx], labels):',
           "if False:",
           ("tests/test_report.py::test_report_draws_the_error_figures_from_the_evaluated_images_and_skips_them_"
            "without_the_data",)),
    Mutant("sim_cache_by_name_only", "the default simulated set is reused after its preset's settings changed",
           PKG + "simulate.py", 'name = f"{DEFAULT_PRESET}-{digest}-seed{seed}',
           'name = f"{DEFAULT_PRESET}-seed{seed}',
           ("tests/test_simulate.py::test_the_default_sets_cache_is_keyed_by_the_presets_settings",)),
    Mutant("psf_scan_unpaired", "the PSF scan's table compares different files at each width",
           "experiments/fit_real_lenses.py", "sorted(set.intersection(*(set(v) for v in by_width.values())))",
           "sorted(set.union(*(set(v) for v in by_width.values())))",
           ("tests/test_lensfit.py::test_psf_scan_table_compares_the_same_files_at_every_width",)),
    Mutant("ellipticity_no_factor_2", "the moment ellipticity halves the cross term",
           PKG + "realism.py", "np.hypot(qxx - qyy, 2 * qxy) / s", "np.hypot(qxx - qyy, qxy) / s",
           ("tests/test_realism.py::test_ellipticity_and_axis_of_an_elongated_blob",)),
    Mutant("levels_largest_step", "the count levels are read from the largest step, not the smallest",
           PKG + "realism.py", "float(1.0 / steps.min())", "float(1.0 / steps.max())",
           ("tests/test_realism.py::test_counts_levels_corners_and_sky_fano",)),
    Mutant("sky_fano_in_normalised_units", "the sky's variance over mean is taken in normalised, not count, units",
           PKG + "realism.py", "np.log10(_levels(x) * c.var() / m)", "np.log10(c.var() / m)",
           ("tests/test_realism.py::test_counts_levels_corners_and_sky_fano",)),
    Mutant("two_sample_without_folds", "the two-sample test scores each image with a classifier trained on it",
           PKG + "realism.py", "make().fit(x[tr], y[tr]).predict_proba(x[te])[:, 1]",
           "make().fit(x, y).predict_proba(x[te])[:, 1]",
           ("tests/test_realism.py::test_two_sample_test_tells_apart_only_what_differs",)),
    Mutant("targets_never_missed", "the realism targets test passes whatever the images",
           PKG + "realism.py", "        if med is None or not t[\"p10\"] <= med <= t[\"p90\"]:",
           "        if med is None:",
           ("tests/test_realism.py::test_the_default_preset_keeps_the_real_look",)),
    Mutant("knots_ties_counted", "a knot on a pixel boundary is counted twice",
           PKG + "realism.py", "return float(ndimage.label(peaks, structure=np.ones((3, 3)))[1])",
           "return float(peaks.sum())",
           ("tests/test_realism.py::test_knots_counts_separate_peaks",)),
    # issue 24: what moved into tables and shared casting
    Mutant("variation_rows_reordered", "a new ordering of the variation table changes every preset's images",
           PKG + "simulate.py",
           '    Variation("source_R_sersic_range_arcsec", ("source_R_sersic_arcsec",), _uniform),\n'
           '    Variation("source_n_sersic_range", ("source_n_sersic",), _uniform),\n',
           '    Variation("source_n_sersic_range", ("source_n_sersic",), _uniform),\n'
           '    Variation("source_R_sersic_range_arcsec", ("source_R_sersic_arcsec",), _uniform),\n',
           ("tests/test_simulate.py::test_variation_table_draws_what_the_simulator_drew_before_it",)),
    Mutant("variation_classes_ignored", "every class draws the vortex mass, so sphere images change with it",
           PKG + "simulate.py", "if given is not None and cls in var.classes:", "if given is not None:",
           ("tests/test_simulate.py::test_variation_table_draws_what_the_simulator_drew_before_it",)),
    Mutant("simulation_config_uncast", "a simulation config read back from JSON holds lists, not the tuples written",
           PKG + "simulate.py", '        check_fields(self, "simulation config")', "        pass",
           ("tests/test_simulate.py::test_simulation_config_is_cast_and_checked_as_the_training_config_is",)),
    Mutant("run_spec_uncast", "DEEPLENSE_SIM_TRAIN_PER_CLASS=40 stays the string '40' in the notebook's run",
           NOTEBOOK_PY, '        check_fields(self, "notebook parameters")', "        pass",
           ("tests/test_notebook.py::test_resolve_gives_one_frozen_config_from_cell_environment_and_scale",)),
    Mutant("notebook_outputs_stale", "the package rewords what the notebook shows and the committed run still says "
           "the old words", PKG + "report.py", 'f"\\nHardest class in this run: **', 'f"\\nHardest class: **',
           ("tests/test_notebook.py::test_notebook_executes_and_figures_are_stable",)),
    # issue 25: the leaders' training options, D2
    Mutant("clip_grad_ignored", "--clip-grad is recorded but the gradients are never clipped",
           ENGINE, "        torch.nn.utils.clip_grad_norm_(", "        (lambda *a: None)(",
           ("tests/test_engine.py::test_clip_grad_bounds_each_step",)),
    Mutant("clip_before_unscale", "under fp16's gradient scaler --clip-grad clips the scaled gradients: steps "
           "65536x too small", ENGINE, "        scaler.unscale_(opt)  # clip the true gradients", "        pass  #",
           ("tests/test_engine.py::test_clip_grad_clips_the_unscaled_gradients_under_a_gradient_scaler",)),
    Mutant("ema_never_updated", "--ema keeps the initial weights as the 'average': best.pt is an untrained network",
           ENGINE, "            ema.update_parameters(model if model is not None else net)\n",
           "            pass\n",
           ("tests/test_train.py::test_ema_run_selects_evaluates_and_resumes_on_the_averaged_weights",)),
    Mutant("ema_lost_on_resume", "a resumed EMA run starts a new average from the current weights",
           TRAIN, '        ema.load_state_dict(ckpt["ema"])\n', "        pass\n",
           ("tests/test_train.py::test_ema_run_selects_evaluates_and_resumes_on_the_averaged_weights",)),
    Mutant("ema_selected_on_raw", "an EMA run chooses best.pt by the training weights' score, then saves the average",
           TRAIN, "rec.update(_validate_on_rank0(used, placed,", "rec.update(_validate_on_rank0(model, placed,",
           ("tests/test_train.py::test_ema_run_selects_evaluates_and_resumes_on_the_averaged_weights",)),
    Mutant("patience_ignored", "--patience is recorded but every epoch is trained",
           TRAIN, "    if config.patience and epoch - 1 - best_epoch >= config.patience:",
           "    if False:",
           ("tests/test_train.py::test_patience_stops_training_and_a_resume_stays_stopped",)),
    Mutant("bn_recalibration_skipped", "the default recipe records BatchNorm recalibration but validates and saves "
           "the lagging running statistics (the early selection-loss jumps)",
           TRAIN, "        engine.recalibrate_bn(model, placed, config)", "        pass",
           ("tests/test_train.py::test_bn_recalibration_changes_what_is_evaluated_never_the_training",)),
    Mutant("bn_recalibration_global_rng", "BatchNorm recalibration draws its images from the global random state: "
           "other images each call, and a resumed run differs from an uninterrupted one",
           ENGINE, "idx = torch.randperm(n_train, generator=torch.Generator().manual_seed(config.seed + 7919))[:n]",
           "idx = torch.randperm(n_train)[:n]",
           ("tests/test_engine.py::test_recalibrate_bn_is_update_bn_over_the_seeds_drawn_training_images",)),
    Mutant("bn_recalibration_on_selection_images", "BatchNorm recalibration computes the statistics on the "
           "selection images instead of the training images",
           ENGINE, "plan.to_device(data.x_train[idx[s : s + bs]])",
           "plan.to_device(data.x_sel[idx[s : s + bs] % len(data.x_sel)])",
           ("tests/test_engine.py::test_recalibrate_bn_is_update_bn_over_the_seeds_drawn_training_images",
            "tests/test_train.py::test_bn_recalibration_changes_what_is_evaluated_never_the_training")),
    # issue 26: calibration
    Mutant("temperature_not_applied", "evaluate --calibrated records the temperature but saves and scores the raw "
           "probabilities", EVALUATE, "    probs = apply_temperature(logp, temperature) if calibrated else raw\n",
           "    probs = raw\n",
           ("tests/test_calibration.py::test_evaluate_and_predict_apply_the_temperature_only_when_asked",)),
    Mutant("temperature_tta_mixup", "--tta --calibrated scales TTA-averaged probabilities by the plain predictions' "
           "temperature", EVALUATE, '.get("tta" if tta else "plain")', '.get("plain")',
           ("tests/test_calibration.py::test_evaluate_and_predict_apply_the_temperature_only_when_asked",)),
    Mutant("temperature_fitted_on_training_images", "the temperature is fitted on training images the network has "
           "memorised, not on the selection images", TRAIN,
           "logp = engine.predict_proba(model, placed.x_sel, config,",
           "logp = engine.predict_proba(model, placed.x_train[: len(y_sel)], config,",
           ("tests/test_calibration.py::test_training_fits_temperatures_on_the_selection_images_into_best_pt",)),
    Mutant("reliability_after_is_before", "the reliability diagram's temperature-scaled panel draws the "
           "probabilities as predicted", PKG + "plots.py", 'calibration["calibrated"]))',
           'calibration["uncalibrated"]))',
           ("tests/test_calibration.py::test_the_reliability_diagram_draws_each_state_with_its_own_ece",)),
    Mutant("reliability_hit_by_confidence", "the top-label reliability bins count an image right when its "
           "confidence is above one half, not when its top class is the true one", PKG + "calibration.py",
           "score, hit = p.max(1), (p.argmax(1) == y).astype(np.float64)",
           "score, hit = p.max(1), (p.max(1) > 0.5).astype(np.float64)",
           ("tests/test_calibration.py::test_the_top_label_bins_drawn_are_the_ones_the_ece_is_computed_from",)),
    Mutant("substructure_column_row_swapped", "substructure.csv gives a point's row as its column and its column as "
           "its row (the saved array transposed)", PKG + "simulate.py",
           "repr(float(k[\"center_y\"])), repr(float(column)), repr(float(row))])",
           "repr(float(k[\"center_y\"])), repr(float(row)), repr(float(column))])",
           ("tests/test_simulate.py::test_a_subhalos_pixel_position_is_where_it_changes_the_image",
            "tests/test_simulate.py::test_substructure_sidecar_lists_the_point_masses_each_image_was_rendered_with")),
    Mutant("substructure_vortex_middle", "substructure.csv's second vortex end is the line's middle point",
           PKG + "simulate.py", '(kw[-1], "vortex_end", total)', '(kw[len(kw) // 2], "vortex_end", total)',
           ("tests/test_simulate.py::test_substructure_sidecar_lists_the_point_masses_each_image_was_rendered_with",)),
    Mutant("saliency_tta_not_turned_back", "explain's TTA maps are averaged in each view's orientation, not turned "
           "back onto the image's", PKG + "explain.py",
           "torch.as_tensor(np.asarray(m, dtype=np.float64)), _inverse(k))",
           "torch.as_tensor(np.asarray(m, dtype=np.float64)), k)",
           ("tests/test_explain.py::test_integrated_gradients_stay_on_the_pixels_that_differ_from_the_black_baseline",
            "tests/test_explain.py::test_tta_maps_are_the_mean_of_each_views_map_turned_back")),
    Mutant("saliency_crop_at_corner", "explain places the crop's map in the corner of the native image, not at its "
           "centre", PKG + "explain.py", "o = (native - c) // 2", "o = 0",
           ("tests/test_explain.py::test_every_arch_gives_grad_cam_maps_on_the_native_image",)),
    Mutant("enrichment_control_not_turned", "the enrichment's control is the true structure itself, not turned about "
           "the lens centre", PKG + "explain.py",
           "near_fraction(m, k, _turned(k, p, centre, rng), radius) for _ in range(n_random)",
           "near_fraction(m, k, p, radius) for _ in range(n_random)",
           ("tests/test_explain.py::test_enrichment_is_high_on_the_substructure_and_about_one_for_uniform_maps",)),
    Mutant("vortex_near_its_ends_only", "a vortex's near region is around its two ends, not along its line",
           PKG + "explain.py", 'if kind == "vortex_end":\n        a, b', 'if kind == "never":\n        a, b',
           ("tests/test_explain.py::test_enrichment_is_high_on_the_substructure_and_about_one_for_uniform_maps",)),
    Mutant("hardest_are_the_easiest", "report's highest-loss figure shows each class's lowest-loss images",
           PKG + "report.py", "np.argsort(-loss[labels == k], kind=\"stable\")",
           "np.argsort(loss[labels == k], kind=\"stable\")",
           ("tests/test_report.py::test_error_examples_pick_the_highest_losses_and_the_most_confident_errors",)),
    Mutant("ece_per_image_gap", "the ECE averages each image's |hit - confidence| instead of each bin's gap",
           PKG + "calibration.py",
           "gap = np.abs(np.bincount(b, weights=hit, minlength=n_bins) - "
           "np.bincount(b, weights=score, minlength=n_bins))",
           "gap = np.bincount(b, weights=np.abs(hit - score), minlength=n_bins)",
           ("tests/test_calibration.py::test_ece_of_a_known_overconfident_model_and_of_a_calibrated_one",
            "tests/test_calibration.py::test_classwise_ece_matches_scikit_learns_calibration_curve")),
    Mutant("d2_draws_quarter_turns", "--augmentation d2 turns images by quarter turns too",
           PKG + "transforms.py", "return 2 * torch.randint(0, 4, (n,), generator=generator)",
           "return torch.randint(0, 8, (n,), generator=generator)",
           ("tests/test_transforms.py::test_d2_augmentation_keeps_the_x_axis_and_covers_its_four_symmetries",)),
    Mutant("d2_tta_over_d4", "a d2 run's test-time averaging includes the quarter turns it never trained on",
           PKG + "transforms.py", 'return D2_ELEMENTS if mode == "d2" else tuple(range(8))', "return tuple(range(8))",
           ("tests/test_engine.py::test_d2_runs_average_over_the_d2_symmetries_only",)),
    # issue 25: transformers and attention on ResNet
    Mutant("vit_embeddings_not_interpolated", "ViT's ImageNet weights are refused at any input but 224 px",
           PKG + "model.py", "        sd = interpolate_embeddings(image_size, INPUT_MULTIPLE[arch], sd)",
           "        pass",
           ("tests/test_model.py::test_imagenet_weights_of_each_arch_from_a_planted_hub_file",)),
    Mutant("se_not_identity_at_start", "resnet34_attn (se) starts from a perturbed ResNet34, not the ImageNet one",
           PKG + "model.py", "        nn.init.zeros_(self.fc[-1].weight)\n", "\n",
           ("tests/test_model.py::test_resnet34_with_attention_starts_as_the_imagenet_resnet34",)),
    Mutant("cbam_spatial_not_zeroed", "CBAM's spatial attention starts as a random gate",
           PKG + "model.py", "for layer in (self.mlp[-1], self.spatial):", "for layer in (self.mlp[-1],):",
           ("tests/test_model.py::test_resnet34_with_attention_starts_as_the_imagenet_resnet34",)),
    Mutant("mhsa_residual_on_at_start", "the self-attention block is added at full strength from random weights",
           PKG + "model.py", "self.scale = nn.Parameter(torch.zeros(()))", "self.scale = nn.Parameter(torch.ones(()))",
           ("tests/test_model.py::test_resnet34_with_attention_starts_as_the_imagenet_resnet34",)),
    Mutant("attention_lost_on_rebuild", "evaluate rebuilds resnet34_attn with the default attention, not its own",
           PKG + "checkpoint.py", 'attention=cfg.get("attention"))', "attention=None)",
           ("tests/test_train.py::test_every_arch_trains_resumes_evaluates_predicts_and_explains",)),
    Mutant("input_side_lost_on_rebuild", "evaluate rebuilds vit_b_16 for 224 px whatever input it trained on",
           PKG + "checkpoint.py", 'image_size=cfg.get("image_size", 224)', "image_size=224",
           ("tests/test_train.py::test_every_arch_trains_resumes_evaluates_predicts_and_explains",)),
    # issue 37: the third probe round
    Mutant("demo_deletes_a_train_run", "demo --out RUN deletes a training run's folder (best.pt, last.pt, the user's "
           "notes) and replaces it", NOTEBOOK_PY, "    if not (path / RUN_MARKER).is_file():\n",
           '    if (path / "config.json").is_file():\n        return sorted(path.rglob("*"), reverse=True)\n'
           "    if not (path / RUN_MARKER).is_file():\n",
           ("tests/test_notebook.py::test_fresh_run_folder_replaces_only_a_previous_notebook_run",
            "tests/test_notebook.py::test_demo_refuses_a_training_run_before_the_kernel_starts")),
    Mutant("none_cannot_override_a_recipe", "train --bn-recalibration none (or --resize-then-crop none) is silently "
           "ignored: the recipe's value stays", PKG + "cli.py",
           "    given = {k: getattr(args, k) for k in TRAIN_OPTIONS if hasattr(args, k)}",
           "    given = {k: getattr(args, k) for k in TRAIN_OPTIONS if getattr(args, k, None) is not None}",
           ("tests/test_cli.py::test_none_switches_a_recipe_setting_off_and_tiny_eval_batches_work",)),
    Mutant("recalibration_in_batches_of_one", "train --eval-batch-size 1 ends in a traceback after epoch 1 "
           "(BatchNorm recalibration on single images)", ENGINE,
           "    bs = max(2, data.eval_batch_size or config.eval_batch_size or default_eval_batch_size(plan))",
           "    bs = data.eval_batch_size or config.eval_batch_size or default_eval_batch_size(plan)",
           ("tests/test_cli.py::test_none_switches_a_recipe_setting_off_and_tiny_eval_batches_work",)),
    Mutant("temperature_fit_clips_apply_does_not", "the temperature is fitted on probabilities clipped at 1e-12 but "
           "applied to the exact ones: the stored T can make the probabilities worse", PKG + "calibration.py",
           "    z = _log_probabilities(log_probabilities)\n    if y.shape",
           "    z = np.log(np.clip(np.exp(_log_probabilities(log_probabilities)).astype(np.float32), 1e-12, None))\n"
           "    if y.shape",
           ("tests/test_calibration.py::test_the_fit_scores_what_is_applied_and_never_raises_the_nll",)),
    Mutant("temperature_stored_when_worse", "a temperature that raises the selection NLL is stored anyway",
           PKG + "calibration.py", "    kept = after < before\n", "    kept = True\n",
           ("tests/test_calibration.py::test_the_fit_scores_what_is_applied_and_never_raises_the_nll",)),
    Mutant("explain_names_collide", "explain train/no/1.npy val/no/1.npy writes both to no_1.png: one figure lost",
           PKG + "explain.py", "        stem = out / name\n", '        stem = out / f"{f.parent.name}_{f.stem}"\n',
           ("tests/test_explain.py::test_explain_files_and_an_evaluation_end_to_end",)),
    Mutant("explain_swapped_checkpoint", "explain --evaluation draws another network's maps when best.pt was "
           "replaced after the evaluation", PKG + "explain.py", "    _check_evaluated_checkpoint(ev, prov, ckpt)\n",
           "", ("tests/test_explain.py::test_explain_files_and_an_evaluation_end_to_end",)),
    Mutant("interval_level_90", "every '95% interval' is a 90% one", METRICS,
           "np.percentile(v, 2.5)), float(np.percentile(v, 97.5))", "np.percentile(v, 5)), float(np.percentile(v, 95))",
           ("tests/test_metrics.py::test_the_95_percent_intervals_cover_the_true_value_95_percent_of_the_time",)),
    Mutant("report_draws_an_edited_matrix", "report draws a hand-edited confusion matrix from metrics.json",
           PKG + "report.py", "    if cm != counted:", "    if False:",
           ("tests/test_report.py::test_a_hand_edited_confusion_matrix_is_refused_in_one_line",)),
    Mutant("config_ranges_unchecked", "--weight-decay -1, --step-size 0, --warmup-epochs -1 are accepted (then a "
           "traceback, or a schedule started half-way)", PKG + "config.py", "        if valid and not valid[0](value):",
           "        if False:", ("tests/test_cli.py::test_arguments_are_checked_before_any_work",)),
    Mutant("nan_option_accepted", "--momentum nan and --clip-grad inf are accepted (inf written to config.json)",
           PKG + "config.py", "        if types[f.name][0] is float and not math.isfinite(value):",
           "        if False:", ("tests/test_cli.py::test_arguments_are_checked_before_any_work",)),
    Mutant("misspelt_variable_ignored", "DEEPLENSE_EPOCH=3 is silently ignored", NOTEBOOK_PY,
           '        if name.startswith("DEEPLENSE_") and name not in known:', "        if False:",
           ("tests/test_notebook.py::test_a_misspelt_notebook_variable_is_refused",)),
    Mutant("relative_data_from_the_kernel", "a relative DEEPLENSE_DATA is looked up in Common_Task/, not where the "
           "user ran demo", NOTEBOOK_PY, "            env[k] = str(Path(value).resolve())", "            pass",
           ("tests/test_notebook.py::test_demo_no_readme_runs_into_a_new_folder_with_relative_data",)),
    Mutant("realism_same_sample", "realism --real X --data X reports AUC 0.000 for identical samples",
           PKG + "realism.py", "    if shared:\n", "    if False:\n",
           ("tests/test_realism.py::test_realism_refuses_what_it_cannot_compare_before_any_work",)),
    Mutant("realism_missing_class", "realism with a class folder missing pools different class mixes",
           PKG + "realism.py",
           "        missing = [c for k, c in enumerate(CLASSES) if not np.any(np.asarray(labels) == k)]",
           "        missing = []",
           ("tests/test_realism.py::test_realism_refuses_what_it_cannot_compare_before_any_work",)),

    # issue 38: the D4-invariant network
    Mutant("group_action_broken", "d4net's group convolution permutes its input copies by g h instead of g^-1 h: "
           "the network is no longer invariant", PKG + "equivariant.py",
           "            w = w[:, :, [D4.compose(D4.inverse(g), h) for h in range(ORDER)]]",
           "            w = w[:, :, [D4.compose(g, h) for h in range(ORDER)]]",
           ("tests/test_equivariant.py",)),
    Mutant("batchnorm_per_copy", "d4net's BatchNorm keeps statistics per copy of a field: invariant only until "
           "training moves them", PKG + "equivariant.py",
           "        self.norm = nn.BatchNorm3d(fields)\n\n    def forward(self, x):\n        b, c, h, w = x.shape\n"
           "        return self.norm(x.view(b, c // ORDER, ORDER, h, w)).view(b, c, h, w)\n",
           "        self.norm = nn.BatchNorm2d(fields * ORDER)\n\n    def forward(self, x):\n"
           "        return self.norm(x)\n",
           ("tests/test_equivariant.py",)),
    Mutant("no_group_pooling", "d4net reads one copy of each field instead of pooling over the group: its output "
           "turns with the input", PKG + "equivariant.py",
           "        return x.view(b, c // ORDER, ORDER, h, w).amax(dim=2)",
           "        return x.view(b, c // ORDER, ORDER, h, w)[:, :, 0]", ("tests/test_equivariant.py",)),
)


def _copy_tree(dst: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints", "out", "*.egg-info")
    for name in COPY:
        src = REPO / name
        if not src.exists():
            continue
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=ignore)
        else:
            shutil.copy2(src, dst / name)


def _env(root: Path) -> dict:
    # the copy's package first on the path (the editable install points at the original)
    return {**os.environ, "PYTHONPATH": str(root / "Common_Task"), "TQDM_DISABLE": "1", "MPLBACKEND": "Agg",
            "PYTHONDONTWRITEBYTECODE": "1"}


def _pytest(root: Path, tests, timeout: int) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rf", *tests]
    try:
        proc = subprocess.run(cmd, cwd=root, env=_env(root), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timed out"
    return proc.returncode, proc.stdout + proc.stderr


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="comma-separated mutant names (default: all)")
    p.add_argument("--list", action="store_true", help="list the faults and exit")
    p.add_argument("--no-baseline", action="store_true", help="skip running the tests on the unmutated copy")
    p.add_argument("--timeout", type=int, default=900, help="seconds per pytest run (default 900)")
    args = p.parse_args(argv)
    mutants = MUTANTS
    if args.only:
        names = args.only.split(",")
        unknown = sorted(set(names) - {m.name for m in MUTANTS})
        if unknown:
            print(f"error: unknown mutant(s) {', '.join(unknown)}; see --list", file=sys.stderr)
            return 2
        mutants = tuple(m for m in MUTANTS if m.name in names)
    if args.list:
        for m in mutants:
            print(f"{m.name:30s} {m.fault}  [{m.file}]")
        return 0

    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="deeplense-mutants-") as tmp:
        base = Path(tmp) / "base"
        _copy_tree(base)
        where = subprocess.run([sys.executable, "-c", "import deeplense; print(deeplense.__file__)"], cwd=base,
                               env=_env(base), capture_output=True, text=True).stdout.strip()
        if not where.startswith(str(base)):
            print(f"error: the copy's package is not the one imported ({where})", file=sys.stderr)
            return 2
        if not args.no_baseline:
            tests = sorted({t for m in mutants for t in m.tests})
            t0 = time.time()
            rc, out = _pytest(base, tests, args.timeout * 2)
            if rc != 0:
                print(out[-4000:])
                print(f"error: the tests fail on the unmutated copy (exit {rc}); fix them first", file=sys.stderr)
                return 2
            print(f"baseline: {len(tests)} tests pass on the unmutated copy ({time.time() - t0:.0f} s)", flush=True)
        killed = 0
        for m in mutants:
            root = Path(tmp) / m.name
            shutil.copytree(base, root)
            path = root / m.file
            text = path.read_text()
            if text.count(m.old) != 1:
                print(f"STALE     {m.name:28s} its source text occurs {text.count(m.old)} times in {m.file}; "
                      f"update the snippet", flush=True)
                shutil.rmtree(root)
                continue
            path.write_text(text.replace(m.old, m.new))
            t0 = time.time()
            rc, out = _pytest(root, m.tests, args.timeout)
            took = f"({time.time() - t0:3.0f} s)"
            if rc == 1:
                killed += 1
                failed = re.findall(r"^FAILED (\S+)", out, flags=re.M)
                print(f"KILLED    {m.name:28s} {took} by {failed[0] if failed else 'a failing test'}", flush=True)
            elif rc == 0:
                print(f"SURVIVED  {m.name:28s} {took} the tests passed with the fault planted: {m.fault}",
                      flush=True)
            else:
                last = out.strip().splitlines()[-1] if out.strip() else ""
                print(f"ERROR     {m.name:28s} {took} pytest exit {rc}: {last}", flush=True)
            shutil.rmtree(root)
    print(f"# {(time.time() - t_start) / 60:.1f} min")
    print(f"mutants: {killed} of {len(mutants)} killed")
    return 0 if killed == len(mutants) else 1


if __name__ == "__main__":
    raise SystemExit(main())
