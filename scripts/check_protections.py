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
        "dino_jax/trainer.py",
        'elif not all(math.isfinite(values[k]) for k in ("train/loss", "train/grad_norm")):',
        "elif False:",
        ("tests/test_faults_nonfinite.py",),
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
        "dino_jax/checkpoint.py",
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
        "dino_jax/interop/pth_read.py",
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
        "dino_jax/trainer.py",
        "    validate(config, mesh.size, jax.process_count())\n",
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
        "dino_jax/trainer.py",
        "config.data, config.optim.batch_size, start_step=start_step, skips=skips",
        "config.data, config.optim.batch_size, start_step=0, skips=skips",
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
