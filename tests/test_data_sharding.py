"""Local batches become global arrays sharded on axis 0: 8 CPU devices, and 2 real processes."""

import itertools
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
from helpers.localhost import free_port
from helpers.tiny import data_config
from helpers.xla import xla_flags
from jax.sharding import PartitionSpec

from dino_jax.data import pipeline
from dino_jax.parallel import make_mesh

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_global_batch_is_sharded_on_axis_0_over_8_devices():
    mesh = make_mesh()
    assert mesh.devices.size == 8
    local = next(iter(pipeline.train_data(data_config(), 16)))
    batch = pipeline.to_global(local, mesh)
    assert batch.keys() == local.keys()
    for key, array in batch.items():
        assert array.shape == local[key].shape and array.dtype == local[key].dtype
        assert array.sharding.spec == PartitionSpec("data")
        shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start)
        assert [s.device for s in shards] == list(mesh.devices.flat)
        for i, shard in enumerate(shards):
            assert shard.data.shape[0] == 2  # 16 examples over 8 devices
            np.testing.assert_array_equal(shard.data, local[key][2 * i : 2 * i + 2])


def test_device_batches_keeps_order_and_content():
    mesh = make_mesh()
    local = list(itertools.islice(iter(pipeline.train_data(data_config(), 8)), 5))
    out = list(pipeline.device_batches(local, mesh, prefetch=2))
    assert len(out) == 5
    for got, want in zip(out, local, strict=True):
        np.testing.assert_array_equal(np.asarray(got["label"]), want["label"])
        np.testing.assert_array_equal(np.asarray(got["image"]), want["image"])


def test_eval_batches_with_mask_shard_too():
    mesh = make_mesh()
    batches = list(pipeline.eval_data(data_config(), "test", 24))
    last = pipeline.to_global(batches[-1], mesh)  # 2,000 = 83 * 24 + 8: the last is padded
    assert int(np.asarray(last["mask"]).sum()) == 8 and last["mask"].sharding.spec == PartitionSpec(
        "data"
    )


CHILD = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    import ml_collections, numpy as np
    from jax.experimental import multihost_utils
    from dino_jax.data import pipeline
    from dino_jax.parallel import make_mesh

    config = ml_collections.ConfigDict(json.loads(sys.argv[3]))
    data = pipeline.train_data(config, 8)  # process index and count come from jax
    local = next(iter(data))
    batch = pipeline.to_global(local, make_mesh())
    shards = sorted(batch["label"].addressable_shards, key=lambda s: s.index[0].start)
    gathered = multihost_utils.process_allgather(batch["label"], tiled=True)
    image_sum = multihost_utils.process_allgather(batch["image"].sum(), tiled=True)
    print("RESULT " + json.dumps({
        "process": jax.process_index(),
        "devices": [jax.local_device_count(), jax.device_count()],
        "shape": list(batch["image"].shape),
        "local_labels": local["label"].tolist(),
        "shard_rows": [[s.index[0].start, s.index[0].stop] for s in shards],
        "shard_labels": [np.asarray(s.data).tolist() for s in shards],
        "gathered": np.asarray(gathered).tolist(),
        "image_sum": int(image_sum),
    }))
    jax.distributed.shutdown()
    """
)


def test_two_processes_each_feed_their_own_half(tmp_path):
    config = data_config()
    env = {
        **os.environ,
        "XLA_FLAGS": xla_flags(2),
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
    }
    address = f"localhost:{free_port()}"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, address, str(i), json.dumps(config.to_dict())],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = {}
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err[-3000:]
        line = next(line for line in out.splitlines() if line.startswith("RESULT "))
        result = json.loads(line.removeprefix("RESULT "))
        results[result["process"]] = result

    expected = [
        next(iter(pipeline.train_data(config, 8, process_index=p, process_count=2)))
        for p in range(2)
    ]
    for p in range(2):
        result = results[p]
        assert result["devices"] == [2, 4] and result["shape"] == [8, 32, 32, 3]
        assert result["local_labels"] == expected[p]["label"].tolist()
        # This process's devices hold rows [4p, 4p + 4) of the global batch: its own batch.
        assert result["shard_rows"] == [[4 * p, 4 * p + 2], [4 * p + 2, 4 * p + 4]]
        assert [x for s in result["shard_labels"] for x in s] == expected[p]["label"].tolist()
    both = np.concatenate([e["label"] for e in expected]).tolist()
    assert results[0]["gathered"] == results[1]["gathered"] == both
    assert results[0]["image_sum"] == sum(int(e["image"].sum()) for e in expected)
