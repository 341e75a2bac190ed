"""Weighted k-NN: parity with the official eval_knn, sharded bank, chunked queries, feature I/O."""

import json

import jax
import numpy as np
import pytest

from dino_jax import parallel
from dino_jax.evaluate import knn


@pytest.fixture(scope="module")
def golden(fixtures_dir):
    with np.load(fixtures_dir / "knn.npz") as data:
        return dict(data)


def _classify(golden, mesh, **kwargs):
    inputs = [golden[f"in/{name}"] for name in ("train_features", "train_labels")]
    inputs += [golden[f"in/{name}"] for name in ("test_features", "test_labels")]
    return knn.knn_classify(*inputs, ks=(20,), temperature=0.07, mesh=mesh, **kwargs)


def _assert_matches_official(result, golden):
    meta = json.loads(str(golden["meta"]))
    assert meta["call"] == {"T": 0.07, "k": 20, "num_classes": 10}
    assert not golden["out/top5_tie_sensitive"].any()
    scores = result.per_k[20]
    assert scores.top1 == golden["out/top1"] == 71.0
    assert scores.top5 == golden["out/top5"] == 96.0
    np.testing.assert_array_equal(scores.pred_top1, golden["out/pred_top1"])
    np.testing.assert_array_equal(scores.pred_top5, golden["out/pred_top5"])
    np.testing.assert_array_equal(result.nn_indices, golden["out/nn_indices"])
    np.testing.assert_allclose(result.nn_similarity, golden["out/nn_similarity"], rtol=0, atol=1e-6)
    # Classes without a neighbour score exactly 0, as in the official one-hot sum.
    np.testing.assert_allclose(scores.class_scores, golden["out/class_scores"], rtol=1e-4, atol=0)


def test_matches_official_on_one_device(golden):
    result = _classify(golden, parallel.make_mesh(jax.devices()[:1]))
    assert result.num_classes == 10  # inferred from the labels, not the official 1000
    assert result.per_k[20].class_scores.shape == (100, 10)
    _assert_matches_official(result, golden)
    assert result.metrics() == {"knn/top1_k20": 71.0, "knn/top5_k20": 96.0}


@pytest.mark.parametrize(("n_devices", "block_size"), [(8, 65536), (4, 16)])
def test_matches_official_sharded_and_chunked(golden, n_devices, block_size):
    # 300 bank rows: 38 per device on 8 (304 rows, 4 of them padding), or 2 blocks of 38 rows on
    # each of 4. 100 queries in chunks of 16, the last one padded by 12.
    mesh = parallel.make_mesh(jax.devices()[:n_devices])
    result = _classify(golden, mesh, chunk_size=16, block_size=block_size, num_classes=10)
    _assert_matches_official(result, golden)


def test_accuracies_without_per_sample_outputs(golden):
    result = _classify(golden, parallel.make_mesh(), chunk_size=32, per_sample=False)
    assert result.metrics() == {"knn/top1_k20": 71.0, "knn/top5_k20": 96.0}
    assert result.nn_indices is None and result.per_k[20].class_scores is None


def _brute_force(train, train_labels, test, ks, temperature, num_classes):
    """Reference in float64 numpy: stable sorts give the lower index first among exact ties."""
    sims = test.astype(np.float64) @ train.T.astype(np.float64)
    order = np.argsort(-sims, axis=1, kind="stable")[:, : max(ks)]
    per_k = {}
    for k in ks:
        votes = np.zeros((len(test), num_classes))
        weights = np.exp(np.take_along_axis(sims, order[:, :k], axis=1) / temperature)
        np.add.at(votes, (np.arange(len(test))[:, None], train_labels[order[:, :k]]), weights)
        per_k[k] = votes
    return order, np.take_along_axis(sims, order, axis=1), per_k


@pytest.mark.parametrize(("n_devices", "block_size"), [(1, 65536), (1, 100), (8, 65536), (8, 100)])
def test_sharded_search_equals_brute_force(n_devices, block_size):
    # Blocks of at least 2 x 64 rows: 1 or 16 blocks on one device, 1 or 2 on each of 8.
    rng = np.random.default_rng(0)
    n_bank, n_test, dim, num_classes, ks = 2003, 45, 8, 7, (1, 3, 20, 64)
    # Multiples of 1/8 in [-1/4, 1/4]: similarities are exact in float32 and often tie exactly, so
    # the tie rule (lower bank index first, lower class first) is exercised, not just the ordering.
    train = rng.integers(0, 3, (n_bank, dim)).astype(np.float32) / 8
    test = rng.integers(-2, 3, (n_test, dim)).astype(np.float32) / 8
    # A query with no positive similarity: bank padding (zero rows) would win unless masked.
    test[0] = -1 / 8
    train_labels = rng.integers(0, num_classes, n_bank)
    test_labels = rng.integers(0, num_classes, n_test)
    temperature = 0.1
    order, sims, scores = _brute_force(train, train_labels, test, ks, temperature, num_classes)
    assert (np.diff(sims, axis=1) == 0).mean() > 0.3  # the data really is full of ties

    mesh = parallel.make_mesh(jax.devices()[:n_devices])
    result = knn.knn_classify(
        train,
        train_labels,
        test,
        test_labels,
        ks=ks,
        temperature=temperature,
        chunk_size=8,
        block_size=block_size,
        mesh=mesh,
        num_classes=num_classes,
    )
    np.testing.assert_array_equal(result.nn_indices, order)
    np.testing.assert_array_equal(result.nn_similarity, sims)
    for k in ks:
        got = result.per_k[k]
        np.testing.assert_allclose(got.class_scores, scores[k], rtol=1e-6)
        # Ranking is a stable descending sort of the scores (zero-score classes by index).
        ranked = np.argsort(-got.class_scores, axis=1, kind="stable")[:, : min(5, k)]
        np.testing.assert_array_equal(got.pred_top5, ranked)
        np.testing.assert_array_equal(got.pred_top1, ranked[:, 0])
        assert got.top1 == 100.0 * np.sum(ranked[:, 0] == test_labels) / n_test
        assert got.top5 == 100.0 * np.sum((ranked == test_labels[:, None]).any(axis=1)) / n_test


def test_kernel_traces_once_for_all_chunks(monkeypatch):
    calls = []
    top_k_of = knn._top_k_of
    monkeypatch.setattr(knn, "_top_k_of", lambda *a: calls.append(1) or top_k_of(*a))
    rng = np.random.default_rng(1)
    train, labels = knn.normalize(rng.normal(size=(50, 5))), rng.integers(0, 3, 50)

    def run(n_test, chunk_size):  # shapes no other test uses, so the first chunk must trace
        test = knn.normalize(rng.normal(size=(n_test, 5)))
        knn.knn_classify(train, labels, test, rng.integers(0, 3, n_test), ks=(2, 4),
                         chunk_size=chunk_size)  # fmt: skip
        return len(calls)

    one_trace = run(7, 7)  # a single chunk
    assert one_trace > 0
    # Five chunks, the last one padded: no more tracing than for one chunk.
    assert run(29, 6) - one_trace == one_trace


def test_fewer_than_five_classes_and_small_k():
    rng = np.random.default_rng(2)
    train, test = (np.asarray(knn.normalize(rng.normal(size=(n, 4)))) for n in (40, 12))
    result = knn.knn_classify(
        train, rng.integers(0, 3, 40), test, rng.integers(0, 3, 12), ks=(2, 10)
    )
    assert result.num_classes == 3
    # With 3 classes every class is in the "top-5"; with k = 2 only the first 2 ranked count,
    # as the official min(5, k).
    assert result.per_k[10].pred_top5.shape == (12, 3) and result.per_k[10].top5 == 100.0
    assert result.per_k[2].pred_top5.shape == (12, 2)


def test_rejects_bad_arguments():
    feats, labels = np.eye(4, dtype=np.float32), np.arange(4)
    with pytest.raises(ValueError, match="ks"):
        knn.knn_classify(feats, labels, feats, labels, ks=(5,))
    with pytest.raises(ValueError, match="labels"):
        knn.knn_classify(feats, labels, feats, labels, ks=(2,), num_classes=3)


def test_normalize_matches_torch_formula():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-20, 0.0]], np.float32)
    np.testing.assert_allclose(knn.normalize(x), [[0.6, 0.8], [0, 0], [1e-8, 0]], rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_save_load_features_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(3)
    features = np.asarray(knn.normalize(rng.normal(size=(17, 6))))
    labels = rng.integers(0, 5, 17).astype(np.int32)
    meta = {"model": "vit_small", "patch_size": 16, "step": 1234, "split": "train"}
    path = tmp_path / "train_features.npz"
    knn.save_features(path, features, labels, meta, dtype=dtype)
    loaded, loaded_labels, loaded_meta = knn.load_features(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_features.npz"]
    assert loaded.dtype == dtype and loaded.shape == (17, 6)
    np.testing.assert_array_equal(loaded, features.astype(dtype))
    np.testing.assert_array_equal(loaded_labels, labels)
    assert loaded_meta == {**meta, "n": 17, "dim": 6, "dtype": dtype}
    # A float16 bank classifies like its float32 source up to float16 rounding.
    got = knn.knn_classify(
        loaded, loaded_labels, features, labels, ks=(1,), mesh=parallel.make_mesh()
    )
    assert got.per_k[1].top1 == 100.0  # every row finds itself
