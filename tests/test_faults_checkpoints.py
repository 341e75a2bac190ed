"""Work directories a resume must not trust: a changed config, another model's checkpoints,
damaged or missing checkpoints (flipped bits in the array data included), planted pickles. Each
gives a clear error, never a fresh start."""

import json
import logging
import os
import pickle
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from helpers.fault_helpers import finalised_steps, history, restore
from helpers.states import assert_states_equal
from helpers.tiny import tiny_config

from dino_jax.checkpoint import HISTORY, Checkpointer
from dino_jax.checkpoint_digests import DIGESTS_KEY, FORMAT_KEY
from dino_jax.checkpoint_resume import CheckpointError
from dino_jax.config import flatten_config
from dino_jax.trainer import build_run, train

# A failed restore leaves Orbax's aborted asynchronous reads to the garbage collector, which
# reports them as unraisable exceptions: expected here, and not errors of the code under test.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A work directory trained for 6 steps (checkpoints 3 and 6) and its final state."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    result = train(tiny_config(**{"train.max_steps": 6}), str(workdir))
    return workdir, result.state


@pytest.fixture
def workdir(trained, tmp_path):
    """A private copy of the trained work directory."""
    copy = tmp_path / "run"
    shutil.copytree(trained[0], copy)
    return copy


def refused(workdir, **overrides) -> str:
    """Resume `workdir`; assert it is refused without training or writing a checkpoint."""
    logs = {p: p.read_text() for p in workdir.glob("*.jsonl")}
    steps = finalised_steps(workdir)
    with pytest.raises(CheckpointError) as err:
        train(tiny_config(**{"train.max_steps": 9, **overrides}), str(workdir))
    assert finalised_steps(workdir) == steps
    assert {p: p.read_text() for p in workdir.glob("*.jsonl")} == logs
    return str(err.value)


def test_changed_shapes_or_recipe_are_refused_listing_the_differences(workdir, tally):
    with tally.fault():
        message = refused(workdir, **{"model.out_dim": 128, "dino.teacher_temp": 0.05})
        assert "model.out_dim: checkpoint 64 -> now 128" in message
        assert "dino.teacher_temp: checkpoint 0.04 -> now 0.05" in message
    with tally.fault():
        message = refused(workdir, **{"optim.lr": 0.001, "optim.epochs": 3})
        assert "optim.lr: checkpoint 0.0005 -> now 0.001" in message
        assert "optim.epochs: checkpoint 2 -> now 3" in message
        assert "allow_config_change=True" in message


def test_allow_config_change_resumes_with_a_new_lr_and_length(workdir, tally):
    with tally.fault():
        changes = {"optim.lr": 0.001, "optim.epochs": 3, "train.allow_config_change": True}
        result = train(tiny_config(**{"train.max_steps": 8, **changes}), str(workdir))
        assert result.status == "max_steps" and int(result.state.step) == 8
        assert history(workdir)[-2:] == [("restored", 6), ("saved", 8)]


def test_another_models_checkpoint_is_refused_naming_the_arrays(workdir, tmp_path, tally):
    with tally.fault():
        # Checkpoints of a wider head whose config record claims to be ours (hand-edited).
        other = tmp_path / "other"
        train(tiny_config(**{"train.max_steps": 3, "model.out_dim": 128}), str(other))
        meta = other / "checkpoints" / "3" / "meta" / "metadata"
        record = json.loads(meta.read_text())
        record["config"] = flatten_config(tiny_config(**{"train.max_steps": 3}))
        meta.write_text(json.dumps(record))
        message = refused(other)
        assert "checkpoint 3" in message and "was written for a different model" in message
        assert "center: checkpoint ((1, 128), 'float32') -> this model ((1, 64), 'float32')" in (
            message
        )


def truncate_arrays(step_dir):
    for path in (step_dir / "state" / "d").iterdir():
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_meta(step_dir, change) -> None:
    """Rewrite the metadata record of a checkpoint (config, digests) through `change`."""
    path = step_dir / "meta" / "metadata"
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def set_digest(name: str, value: str):
    return lambda record: record[DIGESTS_KEY]["arrays"].__setitem__(name, value)


def drop(*keys):
    return lambda record: [record.pop(k) for k in keys]


DAMAGE = {
    "truncated arrays": truncate_arrays,
    "array files deleted": lambda d: shutil.rmtree(d / "state" / "d"),
    "state item deleted": lambda d: shutil.rmtree(d / "state"),
    "tree metadata deleted": lambda d: os.remove(d / "state" / "_METADATA"),
    "tree metadata edited": lambda d: (d / "state" / "_METADATA").write_text('{"tree": 1'),
    "config record edited": lambda d: (d / "meta" / "metadata").write_text("{not json"),
    "config record emptied": lambda d: (d / "meta" / "metadata").write_text("{}"),
    "step directory emptied": lambda d: [shutil.rmtree(d), d.mkdir()],
    "array digests deleted": lambda d: edit_meta(d, drop(DIGESTS_KEY)),
    "an array digest changed": lambda d: edit_meta(d, set_digest("center", "0" * 16)),
    "digests and format deleted": lambda d: edit_meta(d, drop(DIGESTS_KEY, FORMAT_KEY)),
}
# What the message says of the damage, beyond its step and the way back.
NAMED = {
    "array digests deleted": "its record of array digests is missing\n",  # the format says
    "an array digest changed": "center: its digest differs",
    "digests and format deleted": f"though {HISTORY} records it as saved with one",
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_checkpoint_is_named_with_the_way_back(workdir, trained, tally, damage):
    with tally.fault():
        DAMAGE[damage](workdir / "checkpoints" / "6")
        message = refused(workdir)
        aside = workdir / "damaged-checkpoint-6"
        assert f"checkpoint 6 at {workdir / 'checkpoints' / '6'} is damaged" in message
        assert f"mv {workdir / 'checkpoints' / '6'} {aside}" in message
        assert "resume from the previous checkpoint, step 3" in message
        assert NAMED.get(damage, "") in message
        if damage == "truncated arrays":  # following the advice retrains steps 3..6 exactly
            os.rename(workdir / "checkpoints" / "6", aside)
            result = train(tiny_config(**{"train.max_steps": 6}), str(workdir))
            assert int(result.state.step) == 6
            assert_states_equal(result.state, trained[1])


def test_a_checkpoint_from_before_digests_resumes_unverified_with_a_warning(
    workdir, trained, caplog
):
    # No format mark, no digests, and a history that predates them too: an older version's.
    edit_meta(workdir / "checkpoints" / "6", drop(DIGESTS_KEY, FORMAT_KEY))
    entries = [json.loads(x) for x in (workdir / HISTORY).read_text().splitlines()]
    old = [{k: v for k, v in e.items() if k != "digests"} for e in entries]
    (workdir / HISTORY).write_text("".join(json.dumps(e) + "\n" for e in old))
    with caplog.at_level(logging.WARNING, logger="dino_jax.checkpoint"):
        result = train(tiny_config(**{"train.max_steps": 6}), str(workdir))
    assert "checkpoint 6 was written before checkpoints recorded array digests" in caplog.text
    assert_states_equal(result.state, trained[1])


# A 4096-wide head: its arrays exceed the 1 KiB that Orbax keeps inside the (checksummed) tree
# nodes, so they are stored in the data files of state/ocdbt.process_0/d/, which carry no
# checksum. The tiny head's arrays all fit inside the tree nodes.
WIDE = {"model.out_dim": 4096}


@pytest.fixture(scope="module")
def trained_wide(tmp_path_factory):
    """A work directory of the wide model trained for 6 steps (checkpoints 3 and 6), its state."""
    workdir = tmp_path_factory.mktemp("wide") / "run"
    result = train(tiny_config(**{"train.max_steps": 6, **WIDE}), str(workdir))
    return workdir, result.state


def stored_values(step_dir) -> list[tuple[bytes, object, int, int]]:
    """(key, data file, offset, length) of every value that the checkpoint's OCDBT tree keeps
    outside its nodes, i.e. in data files: the stored chunks of the larger arrays."""
    base = ts.KvStore.open(f"file://{step_dir / 'state'}/").result()
    root = ts.ocdbt.dump(base).result()["versions"][-1]["root"]["location"]
    node = ts.ocdbt.dump(base, node=root).result()
    assert node["height"] == 0, "a tree of one node was expected"
    out = []
    for entry in node["entries"]:
        if "indirect_value" in entry:
            where, offset, length = entry["indirect_value"].removeprefix("value:").rsplit(":", 2)
            path = step_dir / "state" / where.replace(":", "")
            out.append((entry["key"], path, int(offset), int(length)))
    return out


def flip_at(path, position: int, flip: str) -> bytes:
    """Flip bits at `position` of file `path` (FLIPS); the original content."""
    original = path.read_bytes()
    data = bytearray(original)
    data[position : position + 8] = FLIPS[flip](bytes(data[position : position + 8]))
    path.write_bytes(bytes(data))
    return original


def unverified(workdir, step: int, **overrides):
    """Checkpoint `step` as Orbax alone reads it back (no digests compared), on the host."""
    run = build_run(tiny_config(**overrides))
    abstract = run.restore_target
    ckpt = Checkpointer(str(workdir), keep=3)
    try:
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        return jax.device_get(ckpt.manager.restore(step, args=args).state)
    finally:
        ckpt.close()


FLIPS = {
    "1 bit": lambda b: bytes([b[0] ^ 0x10]) + b[1:],
    "8 bytes": lambda b: bytes(x ^ 0xA5 for x in b),
}


@pytest.mark.parametrize("flip", list(FLIPS))
def test_flipped_array_data_is_refused_naming_the_array(trained_wide, tmp_path, tally, flip):
    with tally.fault():
        workdir = tmp_path / "run"
        shutil.copytree(trained_wide[0], workdir)
        step = workdir / "checkpoints" / "6"
        name = "student.head.last_layer.weight_v"
        chunks = [v for v in stored_values(step) if v[0].startswith(f"{name}/".encode())]
        _, path, offset, length = chunks[0]
        flip_at(path, offset + length // 2, flip)
        # Orbax alone reads the damaged array back without a complaint: only digests see it.
        read = unverified(workdir, 6, **WIDE).student["head"]["last_layer"]["weight_v"]
        assert not np.array_equal(read, trained_wide[1].student["head"]["last_layer"]["weight_v"])
        message = refused(workdir, **WIDE)
        aside = workdir / "damaged-checkpoint-6"
        assert f"checkpoint 6 at {step} is damaged" in message
        assert "1 of its arrays read back differs from what was saved" in message
        assert f"{name}: its digest differs" in message
        assert f"mv {step} {aside}" in message
        assert "resume from the previous checkpoint, step 3" in message
        os.rename(step, aside)  # the advice: steps 3..6 are trained again, exactly
        result = train(tiny_config(**{"train.max_steps": 6, **WIDE}), str(workdir))
        assert_states_equal(result.state, trained_wide[1])


def test_a_flip_in_any_data_file_is_refused_or_not_read(trained_wide, tmp_path, tally):
    # A flip inside a stored value is refused; the other bytes of ocdbt.process_0/ (tree
    # nodes of the per-process database, which the merged tree of state/ does not read) can
    # change without changing what is restored.
    workdir = tmp_path / "run"
    shutil.copytree(trained_wide[0], workdir)
    step = workdir / "checkpoints" / "6"
    values = {path: offset + length // 2 for _, path, offset, length in stored_values(step)}
    # at least one file holds values; how Orbax packs the arrays into files varies by run
    assert values
    with tally.fault():
        for path in sorted((step / "state" / "ocdbt.process_0" / "d").iterdir()):
            original = flip_at(path, values.get(path, path.stat().st_size // 2), "8 bytes")
            if path in values:
                message = refused(workdir, **WIDE)
                assert f"checkpoint 6 at {step} is damaged" in message, path.name
                assert "resume from the previous checkpoint, step 3" in message
            else:  # resumed at step 6, nothing trained: exactly what was saved
                result = train(tiny_config(**{"train.max_steps": 6, **WIDE}), str(workdir))
                assert_states_equal(result.state, trained_wide[1])
            path.write_bytes(original)


def test_missing_checkpoints_refuse_a_fresh_start_over_logged_work(workdir, tally):
    with tally.fault():
        shutil.rmtree(workdir / "checkpoints")
        message = refused(workdir)
        assert "checkpoints.jsonl records checkpoint 6" in message
        assert "holds none" in message and "new work directory" in message


def test_a_run_killed_before_its_first_checkpoint_starts_again(tmp_path, tally):
    with tally.fault():
        # Logged steps, but no checkpoint ever completed: nothing to lose, so start over.
        (tmp_path / "train.jsonl").write_text('{"step": 2, "train/loss": 4.1}\n{"step": 4, "tr')
        result = train(tiny_config(**{"train.max_steps": 3}), str(tmp_path))
        assert int(result.state.step) == 3


class Payload:
    """Unpickling this creates a directory: proof that code from the file ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_orbax_work_dir_never_unpickles(workdir, trained, tmp_path, tally):
    sentinel = str(tmp_path / "code_ran")
    payload = pickle.dumps(Payload(sentinel))
    step = workdir / "checkpoints" / "6"
    planted = [
        workdir / "checkpoints" / "payload.pkl",
        step / "payload.pkl",
        step / "state" / "payload.pkl",
        step / "meta" / "payload.pkl",
    ]
    with tally.bad_input():
        for path in planted:
            path.write_bytes(payload)
        result = train(tiny_config(**{"train.max_steps": 6}), str(workdir))
        assert not os.path.exists(sentinel)
        assert_states_equal(result.state, trained[1])  # resumed at 6: the state read is ours
    # Orbax reads a `checkpoint` file in an item as msgpack (Flax's old format), never pickle.
    for item in ("state/checkpoint", "meta/metadata", "state/_METADATA", "_CHECKPOINT_METADATA"):
        with tally.bad_input():
            target = step / item
            original = target.read_bytes() if target.exists() else None
            target.write_bytes(payload)
            if item == "_CHECKPOINT_METADATA":  # Orbax's own record: not needed to restore
                assert_states_equal(restore(workdir, 6), trained[1])
            else:
                message = refused(workdir)
                assert "checkpoint 6" in message and "is damaged" in message
            assert not os.path.exists(sentinel)
            if original is None:
                target.unlink()
            else:
                target.write_bytes(original)
