"""VectorIndex: exact and approximate structures, upserts, removal, persistence, errors."""

from __future__ import annotations

import numpy as np
import pytest
from contextwise.retrievers.index import VectorIndex


def unit(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_exact_search_finds_each_vector_first() -> None:
    x = unit(200)
    index = VectorIndex(16)
    index.add(np.arange(1000, 1200), x)
    scores, ids = index.search(x[:10], 3)
    assert index.structure == "flat"
    assert ids.shape == scores.shape == (10, 3)
    assert ids[:, 0].tolist() == list(range(1000, 1010))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    # the same ranking as brute force
    brute = np.argsort(-(x[:10] @ x.T), axis=1)[:, :3] + 1000
    assert (ids == brute).all()


def test_missing_slots_are_minus_one() -> None:
    index = VectorIndex(16)
    scores, ids = index.search(unit(2), 4)
    assert (ids == -1).all() and np.isneginf(scores).all()
    index.add([7], unit(1))
    scores, ids = index.search(unit(1), 3)
    assert ids.tolist() == [[7, -1, -1]]
    assert np.isfinite(scores[0, 0]) and np.isneginf(scores[0, 1:]).all()
    l2 = VectorIndex(16, metric="l2")
    l2.add([1], unit(1))
    assert np.isposinf(l2.search(unit(1), 2)[0][0, 1])


def test_single_query_vector_is_one_row() -> None:
    x = unit(5)
    index = VectorIndex(16)
    index.add(range(5), x)
    _, ids = index.search(x[3], 1)
    assert ids.tolist() == [[3]]


def test_add_is_an_upsert_and_remove_ignores_unknown_ids() -> None:
    x = unit(20)
    index = VectorIndex(16)
    index.add(range(20), x)
    index.add([0], x[5])  # id 0 now holds vector 5
    assert len(index) == 20
    np.testing.assert_allclose(index.get([0])[0], x[5])
    assert index.remove([1, 2, 999]) == 2
    assert len(index) == 18 and 1 not in index and 3 in index
    _, ids = index.search(x[1:3], 18)
    assert 1 not in ids and 2 not in ids
    assert index.ids().tolist() == [0, *range(3, 20)]


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_kinds_find_neighbours_and_remove(kind: str) -> None:
    x = unit(2000, seed=1)
    index = VectorIndex(16, kind=kind)
    index.add(np.arange(2000), x)
    assert index.structure == kind
    _, ids = index.search(x[:50], 1)
    assert (ids[:, 0] == np.arange(50)).mean() >= 0.95
    index.remove(np.arange(25))
    _, ids = index.search(x[:25], 5)
    assert not np.isin(ids, np.arange(25)).any()
    index.add([3], x[3])  # re-adding a removed id
    assert index.search(x[3], 1)[1][0, 0] == 3


def test_hnsw_compacts_after_many_removals() -> None:
    x = unit(400, seed=2)
    index = VectorIndex(16, kind="hnsw")
    index.add(range(400), x)
    index.remove(range(200))
    assert len(index) == 200
    assert len(index._pos_ids) == 200  # rebuilt without the tombstones
    _, ids = index.search(x[300], 1)
    assert ids[0, 0] == 300


def test_auto_switches_to_ivf_above_the_exact_limit_and_back() -> None:
    x = unit(1200, seed=3)
    index = VectorIndex(16, exact_limit=1000)
    index.add(range(900), x[:900])
    assert index.structure == "flat"
    index.add(range(900, 1200), x[900:])
    assert index.structure == "ivf" and index.nprobe and index.nprobe >= 8
    _, ids = index.search(x[:100], 1)
    assert (ids[:, 0] == np.arange(100)).mean() >= 0.95
    index.remove(range(800))
    assert index.structure == "flat" and len(index) == 400
    np.testing.assert_allclose(index.get([1000])[0], x[1000], atol=1e-6)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_save_and_load_round_trip(tmp_path, kind: str) -> None:
    x = unit(600, seed=4)
    index = VectorIndex(16, kind=kind)
    index.add(np.arange(600) * 3, x)
    index.remove([0, 3])
    path = index.save(tmp_path / "sub" / "index.cwv")
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    loaded = VectorIndex.load(path)
    assert len(loaded) == 598 and loaded.structure == kind
    assert (loaded.ids() == index.ids()).all()
    a, b = index.search(x[10:20], 5), loaded.search(x[10:20], 5)
    assert (a[1] == b[1]).all()
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    loaded.add([1], x[0])  # still writable
    assert loaded.search(x[0], 1)[1][0, 0] == 1


def test_save_replaces_atomically(tmp_path) -> None:
    path = tmp_path / "index.cwv"
    first = VectorIndex(16)
    first.add([1], unit(1))
    first.save(path)
    second = VectorIndex(16)
    second.add([1, 2], unit(2))
    second.save(path)
    assert len(VectorIndex.load(path)) == 2


def test_clear_errors() -> None:
    index = VectorIndex(16)
    with pytest.raises(ValueError, match="dimension 8.*16-d"):
        index.add([1], unit(1, dim=8))
    with pytest.raises(ValueError, match="floating point"):
        index.add([1], np.ones((1, 16), dtype=np.int64))
    with pytest.raises(ValueError, match="2 ids for 1 vectors"):
        index.add([1, 2], unit(1))
    with pytest.raises(ValueError, match="integers"):
        index.add([1.5], unit(1))
    with pytest.raises(ValueError, match=">= 0"):
        index.add([-1], unit(1))
    with pytest.raises(ValueError, match="more than once"):
        index.add([4, 4], unit(2))
    with pytest.raises(ValueError, match="NaN"):
        index.add([1], np.full((1, 16), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="dimension"):
        index.search(unit(1, dim=4), 1)
    with pytest.raises(ValueError, match="k must be"):
        index.search(unit(1), 0)
    with pytest.raises(KeyError, match="id 9"):
        index.get([9])
    with pytest.raises(ValueError, match="metric"):
        VectorIndex(16, metric="cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind"):
        VectorIndex(16, kind="lsh")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dim"):
        VectorIndex(0)


def test_load_rejects_other_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        VectorIndex.load(tmp_path / "nope")
    bad = tmp_path / "bad.cwv"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="not a contextwise vector index"):
        VectorIndex.load(bad)


def test_use_gpu_true_without_a_gpu_is_a_clear_error() -> None:
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="no GPU"):
        VectorIndex(16, use_gpu=True)
    assert VectorIndex(16, use_gpu="auto")._gpu_allowed() is False


def test_gpu_copy_serves_searches_and_is_refreshed_after_writes(monkeypatch) -> None:
    """The GPU code path, with faiss's GPU calls stood in by CPU clones (no GPU here)."""
    import faiss
    from contextwise.retrievers import index as index_mod

    copies: list[object] = []

    def fake_cpu_to_gpu(res: object, device: int, cpu_index: object) -> object:
        copies.append(cpu_index)
        return faiss.clone_index(cpu_index)

    monkeypatch.setattr(index_mod, "_num_gpus", lambda: 1)
    monkeypatch.setattr(index_mod, "_gpu_resources", lambda: None)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", fake_cpu_to_gpu, raising=False)
    x = unit(50)
    index = VectorIndex(16, use_gpu=True)
    index.add(range(50), x)
    assert index.search(x[7], 1)[1][0, 0] == 7 and len(copies) == 1
    index.search(x[8], 1)
    assert len(copies) == 1  # the copy is reused
    index.remove([7])
    assert index.search(x[7], 1)[1][0, 0] != 7 and len(copies) == 2  # refreshed after a write
    small = VectorIndex(16)  # "auto": too small to be worth a GPU
    small.add(range(50), x)
    small.search(x[0], 1)
    assert len(copies) == 2

    def broken(res: object, device: int, cpu_index: object) -> object:
        raise RuntimeError("not supported on GPU")

    monkeypatch.setattr(faiss, "index_cpu_to_gpu", broken, raising=False)
    fallback = VectorIndex(16, use_gpu=True)
    fallback.add(range(50), x)
    assert fallback.search(x[3], 1)[1][0, 0] == 3  # CPU answers
