"""Remove each reliability protection in turn and check that its fault test then fails.

Usage: python scripts/check_protections.py [NAME_FRAGMENT ...]   (a clean checkout; ~5 minutes)

Each case edits one source file (one line or block), runs the named tests, and puts the file
back, also when interrupted. A case passes when the tests fail without the protection.
"""

from __future__ import annotations

import dataclasses
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Case:
    protection: str
    path: str
    present: str  # the code that protects
    removed: str  # what it becomes
    tests: tuple[str, ...]


CASES = [
    Case(
        "a non-finite loss stops the run",
        "dino_jax/step_checks.py",
        'elif not all(math.isfinite(values[k]) for k in ("train/loss", "train/grad_norm")):',
        "elif False:",
        ("tests/test_faults_nonfinite.py",),
    ),
    Case(
        "the device counts non-finite steps between the host's checks",
        "dino_jax/trainer.py",
        "return state, metrics, count + nonfinite(metrics)",
        "return state, metrics, count",
        ("tests/test_loop_in_flight.py", "-k", "nan_between_checks_stops"),
    ),
    Case(
        "the state is checked finite before every save",
        "dino_jax/trainer.py",
        "if not bool(all_finite(state)):",
        "if False:",
        ("tests/test_faults_nonfinite.py",),
    ),
    Case(
        "a resume that changes shapes or the recipe is refused",
        "dino_jax/checkpoint_resume.py",
        "    if refused:\n        lines =",
        "    if False:\n        lines =",
        ("tests/test_faults_checkpoints.py",),
    ),
    Case(
        "no fresh start over checkpoints the history records",
        "dino_jax/checkpoint.py",
        "    if latest is None:\n        raise CheckpointError(",
        "    if False:\n        raise CheckpointError(",
        ("tests/test_faults_checkpoints.py",),
    ),
    Case(
        "a damaged checkpoint is named with the way back",
        "dino_jax/checkpoint.py",
        '            raise self.damaged(step, f"its arrays cannot be read ({_brief(err)})")'
        " from err",
        "            raise",
        ("tests/test_faults_checkpoints.py",),
    ),
    Case(
        ".pth pickles build allowlisted globals only",
        "dino_jax/interop/pth_unpickle.py",
        "            return ALLOWED_GLOBALS[(module, name)]",
        "            import importlib\n"
        "            return getattr(importlib.import_module(module), name)",
        ("tests/test_pth.py", "-k", "payload or dangerous or edit"),
    ),
    Case(
        "SIGTERM saves and exits 0",
        "dino_jax/preemption.py",
        "self._previous = signal.signal(signal.SIGTERM, self._handle)",
        "self._previous = signal.getsignal(signal.SIGTERM)",
        ("tests/test_faults_kill.py",),
    ),
    Case(
        "the config is validated before any compute",
        "dino_jax/run_start.py",
        "    validate(config, mesh.size, jax.process_count(), jax.default_backend())\n",
        "",
        ("tests/test_bad_config.py",),
    ),
    Case(
        "a bad image is skipped and logged",
        "dino_jax/data/decode.py",
        "        skips.add(key(), e.reason)\n",
        "        raise\n",
        ("tests/test_bad_data_training.py",),
    ),
    Case(
        "a resumed run continues the data stream where it stopped",
        "dino_jax/run_start.py",
        "return dataclasses.replace(data, start_step=start, skips=skips)",
        "return dataclasses.replace(data, start_step=0, skips=skips)",
        ("tests/test_faults_kill.py",),
    ),
    Case(
        "the heartbeat timeout reaches jax.distributed",
        "dino_jax/train.py",
        "            heartbeat_timeout_seconds=args.heartbeat_timeout_seconds,\n",
        "",
        ("tests/test_multihost_faults.py", "-k", "worker"),
    ),
    Case(
        "processes connect their collectives before anything slow",
        "dino_jax/trainer.py",
        "    parallel.connect_processes(mesh)\n",
        "",
        ("tests/test_multihost.py",),
    ),
    Case(
        "a second trainer on one work directory is refused",
        "dino_jax/trainer.py",
        "compiled, WorkdirLock(workdir, jax.process_index()):",
        "compiled:",
        ("tests/test_workdir_lock.py", "-k", "second_trainer"),
    ),
    Case(
        "a second trainer is refused at once, before it lists its data",
        "dino_jax/workdir.py",
        "            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)",
        "            pass",
        ("tests/test_workdir_lock.py", "-k", "second_trainer"),
    ),
    Case(
        "a lock left by a killed trainer does not block (a lock, not a pid file)",
        "dino_jax/workdir.py",
        "            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "        except BlockingIOError:\n            f.seek(0)",
        "            if os.path.getsize(self.path):\n                raise BlockingIOError\n"
        "        except BlockingIOError:\n            f.seek(0)",
        ("tests/test_workdir_lock.py", "-k", "killed"),
    ),
    Case(
        "settings are checked against the data's sizes before the work directory is made",
        "dino_jax/validation_sizes.py",
        "    if sizes.bank is None or sizes.test is None:\n        return []",
        "    if True:\n        return []",
        ("tests/test_bad_config.py", "-k", "bank"),
    ),
    Case(
        "seeds fit jax.random.key, numpy and tf.data",
        "dino_jax/validation_base.py",
        "    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= SEED_MAX:",
        "    if True:",
        ("tests/test_bad_config.py", "-k", "seed"),
    ),
    Case(
        "local crops larger than the global crops are refused",
        "dino_jax/validation.py",
        "        a.n_local == 0 or a.local_size <= a.global_size,",
        "        True,",
        ("tests/test_bad_config.py", "-k", "local and crops and larger"),
    ),
    Case(
        "an empty eval.knn_ks is refused",
        "dino_jax/validation_eval.py",
        "        len(v.knn_ks) > 0 and all(",
        "        all(",
        ("tests/test_bad_config.py", "-k", "empty"),
    ),
    Case(
        "a canvas smaller than the crops is warned about",
        "dino_jax/validation.py",
        "            canvas >= size,",
        "            True,",
        ("tests/test_bad_config.py", "-k", "warned"),
    ),
    Case(
        "the init_from file is checked before the work directory is made",
        "dino_jax/run_start.py",
        "    check_init_from(config)\n    return data",
        "    return data",
        ("tests/test_exit_statuses.py", "-k", "init_from"),
    ),
    Case(
        "training's user errors exit 2 with a message",
        "dino_jax/train.py",
        "    if isinstance(err, (ConfigError, CheckpointError, DataError, WorkdirError)):",
        "    if False:",
        ("tests/test_exit_statuses.py", "-k", "train_refuses"),
    ),
    Case(
        "a failed save exits 4",
        "dino_jax/train.py",
        "    if isinstance(err, CheckpointSaveError):  # a CheckpointError: test it first",
        "    if False:",
        ("tests/test_exit_statuses.py", "-k", "documented_status"),
    ),
    Case(
        "evaluation checks the splits' sizes before computing features",
        "dino_jax/evaluate/cli.py",
        '        errors = size_errors(config, args.command, getattr(args, "features_dir", None))',
        "        errors = []",
        ("tests/test_exit_statuses.py", "-k", "evaluate and (bank or linear)"),
    ),
    Case(
        ".pth pickle memo indices follow the entries written (memo bomb)",
        "dino_jax/interop/pth_checks.py",
        "            if index > len(memo):",
        "            if False:",
        ("tests/test_pth_bounds.py", "-k", "memo_bomb"),
    ),
    Case(
        ".pth pickle record bounded before it is read (decompression bomb)",
        "dino_jax/interop/pth_storage.py",
        "    if info.file_size > limit:",
        "    if False:",
        ("tests/test_pth_bounds.py", "-k", "inflating_past_the_bound"),
    ),
    Case(
        ".pth pickle opcode count bounded",
        "dino_jax/interop/pth_checks.py",
        "        if count > MAX_PICKLE_OPCODES:",
        "        if False:",
        ("tests/test_pth_bounds.py", "-k", "too_many_opcodes"),
    ),
    Case(
        ".pth dict keys limited to kinds that cannot be made to collide",
        "dino_jax/interop/pth_checks.py",
        '            _check_keys(items[1:2] if name == "SETITEM" else items[0::2], "dict key")',
        "            pass",
        ("tests/test_pth_bounds.py", "-k", "share_a_hash"),
    ),
    Case(
        ".pth nesting bounded and cycles refused",
        "dino_jax/interop/pth_read.py",
        "    check_nesting(tree)\n",
        "",
        ("tests/test_pth_bounds.py", "-k", "deep_nesting"),
    ),
    Case(
        ".pth tensor views bounded by the storages (stride 0)",
        "dino_jax/interop/pth_storage.py",
        "        if self.view_elements > bound:",
        "        if False:",
        ("tests/test_pth_bounds.py", "-k", "stride_0"),
    ),
    Case(
        ".pth storages bounded by the file's size (zip bomb)",
        "dino_jax/interop/pth_storage.py",
        "        if self.storage_bytes > self.storage_budget:",
        "        if False:",
        ("tests/test_pth_bounds.py", "-k", "inflating_past_the_file"),
    ),
    Case(
        ".pth non-regular files refused without waiting on them",
        "dino_jax/interop/pth_read.py",
        "    if not stat.S_ISREG(os.fstat(fd).st_mode):",
        "    if False:",
        ("tests/test_pth_bounds.py", "-k", "fifo"),
    ),
    Case(
        "init_from checked against the configured model's shapes",
        "dino_jax/interop/official_shapes.py",
        "    lines += architecture.differences(architecture.state_shapes(arch), found)\n",
        "",
        ("tests/test_init_from.py", "-k", "refuses_with_the_file"),
    ),
    Case(
        "init_from checked from the pickle alone (no storage read)",
        "dino_jax/interop/pth_read.py",
        "                storages = _Storages(archive, prefix, byteorder, ledger, wanted=())",
        "                storages = _Storages(archive, prefix, byteorder, ledger, wanted=None)",
        ("tests/test_init_from.py", "-k", "pickle_only"),
    ),
    Case(
        "official weights that are views into larger storages refused",
        "dino_jax/interop/official.py",
        "    if reading > MAX_STORAGE_OVERHEAD * needed + STORAGE_OVERHEAD_SLACK:",
        "    if False:",
        ("tests/test_init_from.py", "-k", "views_into"),
    ),
    Case(
        "a stream still open at exit is closed before Python finalizes (no hang at exit)",
        "dino_jax/data/batches.py",
        "@atexit.register\ndef close_open_streams",
        "def close_open_streams",
        ("tests/test_data_shutdown.py", "-k", "busy and interrupt"),  # hangs: fails after 60 s
    ),
    Case(
        "a failing tf.data stream's traceback does not keep its iterator alive",
        "dino_jax/data/tf_batches.py",
        "            _forget_frames(error)\n            raise",
        "            raise",
        ("tests/test_data_shutdown.py", "-k", "decoder"),  # hangs: fails after 60 s (3/3)
    ),
    Case(
        "a refused or ended stream stops decoding at once",
        "dino_jax/data/batches.py",
        "            yield batch\n    finally:\n        close_quietly(batches)",
        "            yield batch\n    finally:\n        pass",
        ("tests/test_data_shutdown.py", "-k", "stops_the_decoding"),
    ),
    Case(
        "skipped file names are escaped losslessly in skipped_files.tsv",
        "dino_jax/data/decode.py",
        'return f"{escape_field(key)}\\t{escape_field(reason)}\\n"',
        'return f"{key}\\t{reason}\\n"',
        ("tests/test_data_decode.py", "-k", "read_back_exactly or written_before"),
    ),
    Case(
        "clutter folders and files are neither classes nor images",
        "dino_jax/data/sources/folder.py",
        'return name.startswith(".") or name.casefold() in JUNK_NAMES',
        'return name.startswith(".")',
        ("tests/test_data_folder.py", "-k", "clutter"),
    ),
    Case(
        "the k-NN test split is labelled by the bank's class names",
        "dino_jax/data/sources/folder.py",
        "        all_labels = _labels_by_bank(listing, split, root, data_dir, bank_split)",
        "        pass",
        ("tests/test_data_folder.py", "-k", "bank_labels"),
    ),
    Case(
        "k-NN splits that disagree on class names are refused before any work",
        "dino_jax/data/sources/folder.py",
        "    if missing:\n        hints = []",
        "    if False:\n        hints = []",
        ("tests/test_data_folder.py", "-k", "disagree or before_any_work"),
    ),
    Case(
        "decoded pixels are bounded from the header (after JPEG draft)",
        "dino_jax/data/decode.py",
        "    check_pixels(image.size, (width, height), canvas_size)",
        "    pass",
        ("tests/test_data_decode.py", "-k", "many_pixels or reduced_jpeg"),
    ),
    Case(
        "files over the byte limit are refused unread",
        "dino_jax/data/decode.py",
        "            if info.st_size > max_bytes:",
        "            if False:",
        ("tests/test_data_decode.py", "-k", "unread"),
    ),
    Case(
        "a file swapped for a FIFO or device after the listing is refused without blocking",
        "dino_jax/data/decode.py",
        "            if not stat.S_ISREG(info.st_mode):",
        "            if False:",
        ("tests/test_data_decode.py", "-k", "swapped"),
    ),
    Case(
        "IDX files are read no further than their header says",
        "dino_jax/data/sources/demo.py",
        "            payload = f.read(size + 1)",
        "            payload = f.read()",
        ("tests/test_data_decode.py", "-k", "idx"),
    ),
    Case(
        "every restored array is checked against the digest saved with it",
        "dino_jax/checkpoint.py",
        "        if expected is not None:\n"
        "            self._verify(step, state, expected, abstract_state)\n",
        "",
        ("tests/test_faults_checkpoints.py", "-k", "flipped"),
    ),  # caught by test_flipped_array_data_is_refused_naming_the_array[1 bit], 21-29 s
    Case(
        "a checkpoint of the digest format without its digest record is damaged",
        "dino_jax/checkpoint_digests.py",
        "    if record is None:\n"
        '        raise ValueError("its record of array digests is missing")',
        "    if record is None:\n        return None",
        ("tests/test_faults_checkpoints.py", "-k", "array and digests and deleted"),
    ),  # caught by ...named_with_the_way_back[array digests deleted], 15-21 s
    Case(
        "a checkpoint the history records as saved with digests cannot pass for an older one",
        "dino_jax/checkpoint.py",
        "        if expected is None and self._saved_with_digests(step):",
        "        if False:",
        ("tests/test_faults_checkpoints.py", "-k", "format and deleted"),
    ),  # caught by ...named_with_the_way_back[digests and format deleted], 19-27 s
    Case(
        "a failed asynchronous save is reported as that save, not the next",
        "dino_jax/checkpoint.py",
        "        step = int(jax.device_get(state.step))\n        self._settle()\n",
        "        step = int(jax.device_get(state.step))\n",
        ("tests/test_faults_disk.py", "-k", "background"),
    ),  # caught by test_a_failed_background_save_is_reported_as_that_save, 14-16 s
    Case(
        "a storage failure while saving is one message naming the save and the last checkpoint",
        "dino_jax/checkpoint.py",
        "            failure = self._save_failed(step, err)\n",
        "            failure = None\n",
        ("tests/test_faults_disk.py", "-k", "kernel"),
    ),  # caught by test_train_py_exits_4_when_the_kernel_refuses_a_checkpoint_write, 15-17 s
    Case(
        "what a failed save wrote is removed",
        "dino_jax/checkpoint.py",
        "            self._remove_written(step, patience=10.0)\n",
        "            pass\n",
        ("tests/test_faults_disk.py", "-k", "background"),
    ),  # caught by test_a_failed_background_save_is_reported_as_that_save, 16 s
    Case(
        "Orbax's writers still waiting for a failed save are released",
        "dino_jax/checkpoint_orbax.py",
        "                thread.cancel()\n",
        "                raise RuntimeError\n",
        ("tests/test_faults_disk.py", "-k", "last_save"),
    ),  # caught by test_a_failed_last_save_keeps_the_previous_checkpoint, 44-46 s (30 s join)
    Case(
        "Orbax's and asyncio's reports of the failed writes are kept off the output",
        "dino_jax/checkpoint_orbax.py",
        "            logger.addFilter(drop)\n",
        "            pass\n",
        ("tests/test_faults_disk.py", "-k", "kernel"),
    ),  # caught by test_train_py_exits_4_when_the_kernel_refuses_a_checkpoint_write, 13-16 s
    Case(
        "a line cut short in the history does not swallow the next record",
        "dino_jax/checkpoint_storage.py",
        '            lead = b"" if f.read(1) == b"\\n" else b"\\n"',
        '            lead = b""',
        ("tests/test_checkpoint_digests.py", "-k", "cut_short"),
    ),  # caught by test_an_append_after_a_cut_short_line_keeps_both_records_readable, 3-4 s
    Case(
        "a full disk at the history append is one message",
        "dino_jax/checkpoint.py",
        "            append_line(self.history, json.dumps(entry))\n        except OSError as err:",
        "            append_line(self.history, json.dumps(entry))\n"
        "        except ValueError as err:",
        ("tests/test_faults_disk.py", "-k", "history"),
    ),  # caught by test_a_full_disk_at_the_history_append_is_one_message, 4 s
    Case(
        "a full disk at the final evaluation's write is one message",
        "dino_jax/checkpoint_storage.py",
        "    except OSError as err:\n        _remove_quietly(temporary)",
        "    except ValueError as err:\n        _remove_quietly(temporary)",
        ("tests/test_faults_disk.py", "-k", "final_evaluation"),
    ),  # caught by test_a_full_disk_at_the_final_evaluation_is_one_message, 4-5 s
    Case(
        "a full disk met by a log write exits 4 with one message",
        "dino_jax/train.py",
        "        err = (storage_error(err, workdir) or err) if isinstance(err, OSError) else err\n",
        "",
        ("tests/test_exit_statuses.py", "-k", "full_disk"),
    ),
    Case(
        "float16 compute without loss scaling is refused",
        "dino_jax/validation_model.py",
        '        m.compute_dtype != "float16",',
        "        True,",
        ("tests/test_bad_config.py", "-k", "float16"),
    ),
    Case(
        "a ResNet option on a ViT is refused",
        "dino_jax/validation_model.py",
        '    _unset_unless(e, m, RESNET_KEYS, "ViT", "resnet")',
        "    pass",
        ("tests/test_bad_config.py", "-k", "option and ViT"),
    ),
    Case(
        "stochastic depth on a ResNet is refused",
        "dino_jax/validation_model.py",
        "        m.drop_path_rate == 0.0,",
        "        True,",
        ("tests/test_bad_config.py", "-k", "stochastic and ResNet"),
    ),
    Case(
        "an XCiT or DINOv2 name with another patch size is refused",
        "dino_jax/validation_model.py",
        '            m.patch_size == spec["patch_size"],',
        "            True,",
        ("tests/test_bad_config.py", "-k", "XCiT and name"),
    ),
    Case(
        "attention maps of a network without attention are refused",
        "dino_jax/validation_model.py",
        "            not c.eval.attention_images,",
        "            True,",
        ("tests/test_bad_config.py", "-k", "attention and maps and ResNet"),
    ),
    Case(
        "a DINOv2 ViT option on another backbone is refused",
        "dino_jax/validation_model.py",
        '    if kind in ("vit", "xcit", "resnet"):\n        _dinov2_options_unset(',
        "    if False:\n        _dinov2_options_unset(",
        ("tests/test_bad_config.py", "-k", "registers or SwiGLU"),
    ),
    Case(
        "KoLeo chunks must split the batch",
        "dino_jax/validation.py",
        "            batch % chunks == 0,",
        "            True,",
        ("tests/test_bad_config.py", "-k", "KoLeo and chunks"),
    ),
    Case(
        "iBOT on a backbone without patch tokens or a mask token is refused",
        "dino_jax/validation_patches.py",
        "    elif kind is not None and kind not in MASK_TOKEN_FAMILIES:",
        "    elif False:",
        ("tests/test_bad_config.py", "-k", "iBOT and mask and token"),
    ),
    Case(
        "iBOT mask chunks must split the batch",
        "dino_jax/validation_patches.py",
        '    _chunks_split(e, "dino.ibot_chunks", d.ibot_chunks, c.optim.batch_size)',
        "    pass",
        ("tests/test_bad_config.py", "-k", "iBOT and chunks"),
    ),
    Case(
        "Gram on a backbone without patch tokens is refused",
        "dino_jax/validation_patches.py",
        "    if kind is not None and kind not in PATCH_FAMILIES:",
        "    if False:",
        ("tests/test_bad_config.py", "-k", "Gram and ResNet"),
    ),
    Case(
        "a checkpoint from before the state's extras restores",
        "dino_jax/checkpoint.py",
        "        if not added:\n            return abstract_state, {}",
        "        if True:\n            return abstract_state, {}",
        ("tests/test_ibot_training.py", "-k", "before_the_state_had_extras"),
    ),
    Case(
        "a ResNet/XCiT is exported with its BatchNorm statistics or not at all",
        "dino_jax/interop/official_export.py",
        "    if missing:\n        raise ValueError(",
        "    if False:\n        raise ValueError(",
        ("tests/test_interop_resnet_xcit.py", "-k", "without_its_batch_stats"),
    ),
    Case(
        "an official file's num_batches_tracked must be an integer",
        "dino_jax/interop/official_shapes.py",
        'if name.endswith("num_batches_tracked") and not np.issubdtype(value.dtype, np.integer)',
        "if False",
        ("tests/test_interop_resnet_xcit.py", "-k", "float"),
    ),
    Case(
        "a batch count outside 0..2**31-1 is refused",
        "dino_jax/interop/state_dict.py",
        "    if not _COUNT_RANGE[0] <= int(value) <= _COUNT_RANGE[1]:",
        "    if False:",
        ("tests/test_interop_resnet_xcit.py", "-k", "out_of_range"),
    ),
]


def check(case: Case) -> bool:
    """True when the tests fail with the protection removed."""
    path = ROOT / case.path
    source = path.read_text()
    if case.present not in source:
        raise SystemExit(f"{case.path} no longer holds the code of {case.protection!r}: update")
    path.write_text(source.replace(case.present, case.removed))
    try:
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *case.tests]
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    finally:
        path.write_text(source)
    failed = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    print(f"  {failed[0][:150] if failed else 'no test failed'}")
    return result.returncode != 0


def main(fragments: list[str]) -> int:
    cases = [c for c in CASES if not fragments or any(f in c.protection for f in fragments)]
    caught = 0
    for case in cases:
        start = time.perf_counter()
        print(f"without: {case.protection}", flush=True)
        ok = check(case)
        caught += ok
        print(f"  {'caught' if ok else 'NOT CAUGHT'} ({time.perf_counter() - start:.0f} s)")
    print(f"protections removed: {len(cases)}, caught by the tests: {caught}")
    return 0 if caught == len(cases) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
