"""A FAISS vector index with integer ids that picks its own structure as it grows.

Every retriever (tools, few-shot examples, memory, the semantic cache) needs the
same thing: put vectors under stable integer ids, take some out again, find the
nearest ones, and keep the result on disk. `VectorIndex` does that and hides
FAISS's sharp edges:

- exact search (`IndexFlatIP` inside an `IndexIDMap2`) while the index holds at
  most `exact_limit` vectors: at 50,000 x 384 a brute-force scan is still ~1-2 ms
  and exact, so nothing approximate is worth its recall loss;
- above it (kind="auto") an IVF index trained on the data itself (nlist ~ 4 sqrt(n),
  nprobe ~ nlist/16), retrained when the data has grown 4x since it was trained;
  kind="hnsw" asks for a graph index instead (removal is a tombstone there; the
  graph is compacted when a quarter of it is dead);
- `add` is an upsert: an id that is already stored gets its new vector;
- searches return -1 ids (and -inf, or +inf for "l2", scores) where fewer than k
  vectors exist;
- a GPU copy serves searches when `faiss.get_num_gpus() > 0` and `use_gpu` allows
  ("auto": from 20,000 vectors on; True: always); the CPU index stays the source
  of truth for writes and `save`, and the copy is refreshed after a write.

Files are written atomically (temp file + os.replace) and hold the ids too.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

__all__ = ["VectorIndex"]

Kind = Literal["auto", "flat", "ivf", "hnsw"]
FORMAT = "contextwise.vector_index"
FORMAT_VERSION = 1
RETRAIN_GROWTH = 4  # an IVF index is retrained once the data is this many times bigger
HNSW_MAX_DEAD = 0.25  # compact an HNSW graph when this share of it is removed vectors
GPU_MAX_K = 2048  # faiss GPU search limit
GPU_MIN_VECTORS = 20_000  # use_gpu="auto": below this a CPU scan beats the transfer


class VectorIndex:
    """Nearest-neighbour search over `(id, vector)` pairs.

    metric "ip" (inner product: the cosine for normalized vectors, higher is
    better) or "l2" (squared distance, lower is better).
    """

    def __init__(
        self,
        dim: int,
        *,
        metric: Literal["ip", "l2"] = "ip",
        exact_limit: int = 50_000,
        kind: Kind = "auto",
        use_gpu: bool | Literal["auto"] = "auto",
        nprobe: int | None = None,
        hnsw_m: int = 32,
        ef_search: int = 128,
    ):
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if metric not in ("ip", "l2"):
            raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
        if kind not in ("auto", "flat", "ivf", "hnsw"):
            raise ValueError(f"kind must be 'auto', 'flat', 'ivf' or 'hnsw', got {kind!r}")
        if use_gpu not in ("auto", True, False):
            raise ValueError(f"use_gpu must be 'auto', True or False, got {use_gpu!r}")
        if exact_limit < 0:
            raise ValueError(f"exact_limit must be >= 0, got {exact_limit}")
        if nprobe is not None and nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        self.dim = int(dim)
        self.metric = metric
        self.exact_limit = int(exact_limit)
        self.kind: Kind = kind
        self.use_gpu = use_gpu
        self.hnsw_m = hnsw_m
        self.ef_search = ef_search
        self._nprobe = nprobe
        if use_gpu is True and _num_gpus() == 0:
            raise RuntimeError("use_gpu=True but faiss sees no GPU (is faiss-gpu installed?)")
        self._faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
        self._lock = threading.RLock()
        self._ids: set[int] = set()
        # HNSW stores positions, not ids: position -> id (-1: removed) and back.
        self._pos_ids: list[int] = []
        self._id_pos: dict[int, int] = {}
        self._trained_n = 0  # IVF: how many vectors it was trained on
        self._gpu_index: Any = None
        self._gpu_failed = False
        self.structure: Literal["flat", "ivf", "hnsw"] = "flat"
        self._index: Any = None
        if kind == "hnsw":
            self.structure = "hnsw"
            self._index = self._new_hnsw()
        elif kind == "flat" or kind == "auto":
            self._index = self._new_flat()
        else:  # ivf: trained on the first vectors added
            self.structure = "ivf"

    # ------------------------------------------------------------------ public

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, id: object) -> bool:
        return isinstance(id, (int, np.integer)) and int(id) in self._ids

    def __repr__(self) -> str:
        return (f"VectorIndex(dim={self.dim}, metric={self.metric!r}, n={len(self)}, "
                f"structure={self.structure!r}, gpu={self._gpu_index is not None})")

    def ids(self) -> np.ndarray:
        """The stored ids (int64, ascending)."""
        with self._lock:
            return np.array(sorted(self._ids), dtype=np.int64)

    @property
    def nprobe(self) -> int | None:
        """IVF cells searched per query (None unless the index is an IVF)."""
        if self.structure != "ivf" or self._index is None:
            return None
        return int(self._index.nprobe)

    def add(self, ids: Any, vectors: Any) -> None:
        """Store `vectors` (n, dim) under `ids` (n,); an id already stored is replaced."""
        vecs = self._vectors(vectors, "vectors")
        id_arr = self._id_array(ids, "ids")
        if len(id_arr) != len(vecs):
            raise ValueError(f"got {len(id_arr)} ids for {len(vecs)} vectors; they must match")
        if len(np.unique(id_arr)) != len(id_arr):
            dup = _first_duplicate(id_arr)
            raise ValueError(f"ids must be unique within one add; {dup} appears more than once")
        if not len(id_arr):
            return
        with self._lock:
            stored = [int(i) for i in id_arr if int(i) in self._ids]
            if stored:
                self._remove(np.asarray(stored, dtype=np.int64))
            self._add(id_arr, vecs)
            self._reshape_if_needed()

    def remove(self, ids: Any) -> int:
        """Remove these ids; unknown ids are ignored. Returns how many were removed."""
        id_arr = self._id_array(ids, "ids")
        with self._lock:
            present = np.asarray([i for i in set(id_arr.tolist()) if i in self._ids], np.int64)
            if not len(present):
                return 0
            self._remove(present)
            self._reshape_if_needed()
            return len(present)

    def get(self, ids: Any) -> np.ndarray:
        """The stored vectors of `ids` (n, dim), in order; an unknown id is an error."""
        id_arr = self._id_array(ids, "ids")
        with self._lock:
            missing = [int(i) for i in id_arr if int(i) not in self._ids]
            if missing:
                raise KeyError(f"id {missing[0]} is not in the index")
            if not len(id_arr):
                return np.empty((0, self.dim), np.float32)
            if self.structure == "hnsw":
                pos = np.asarray([self._id_pos[int(i)] for i in id_arr], np.int64)
                storage = faiss.downcast_index(self._index.storage)
                return np.vstack([storage.reconstruct(int(p)) for p in pos])
            return np.vstack([self._index.reconstruct(int(i)) for i in id_arr])

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k per query: (scores (m, k) float32, ids (m, k) int64), best first.

        Slots beyond what the index holds have id -1 and score -inf ("ip") / +inf ("l2").
        A single query of shape (dim,) is treated as (1, dim).
        """
        q = self._vectors(queries, "queries")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        missing = -np.inf if self.metric == "ip" else np.inf
        scores = np.full((len(q), k), missing, dtype=np.float32)
        out_ids = np.full((len(q), k), -1, dtype=np.int64)
        with self._lock:
            if not len(self._ids) or not len(q):
                return scores, out_ids
            kk = min(k, len(self._ids))
            if self.structure == "hnsw":
                d, i = self._search_hnsw(q, kk)
            else:
                d, i = self._searcher(kk).search(q, kk)
        valid = i >= 0
        scores[:, :kk] = np.where(valid, d, missing)
        out_ids[:, :kk] = i
        return scores, out_ids

    def save(self, path: str | Path) -> Path:
        """Write the index (vectors, ids, settings) atomically to `path`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            meta = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "dim": self.dim,
                "metric": self.metric,
                "exact_limit": self.exact_limit,
                "kind": self.kind,
                "structure": self.structure,
                "nprobe": self._nprobe,
                "hnsw_m": self.hnsw_m,
                "ef_search": self.ef_search,
                "trained_n": self._trained_n,
            }
            arrays: dict[str, np.ndarray] = {
                "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                "ids": np.array(sorted(self._ids), dtype=np.int64),
                "pos_ids": np.asarray(self._pos_ids, dtype=np.int64),
                "index": (faiss.serialize_index(self._index) if self._index is not None
                          else np.empty(0, np.uint8)),
            }
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)  # type: ignore[arg-type]
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path, *, use_gpu: bool | Literal["auto"] = "auto") -> VectorIndex:
        """Read an index written by `save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no vector index at {str(path)!r}")
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta"]).decode())
                ids, pos_ids, blob = data["ids"], data["pos_ids"], data["index"]
        except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
            raise ValueError(
                f"{path} is not a contextwise vector index file ({type(e).__name__})"
            ) from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a contextwise vector index file")
        if meta.get("version", 0) > FORMAT_VERSION:
            raise ValueError(f"{path} is format version {meta['version']}; this contextwise "
                             f"reads up to {FORMAT_VERSION}: upgrade contextwise")
        self = cls(meta["dim"], metric=meta["metric"], exact_limit=meta["exact_limit"],
                   kind=meta["kind"], use_gpu=use_gpu, nprobe=meta["nprobe"],
                   hnsw_m=meta["hnsw_m"], ef_search=meta["ef_search"])
        self.structure = meta["structure"]
        self._trained_n = meta["trained_n"]
        self._index = faiss.deserialize_index(blob) if len(blob) else None
        self._ids = set(ids.tolist())
        self._pos_ids = pos_ids.tolist()
        self._id_pos = {i: p for p, i in enumerate(self._pos_ids) if i >= 0}
        if self.structure == "hnsw" and self._index is not None:
            self._index.hnsw.efSearch = self.ef_search
        return self

    # ------------------------------------------------------------------ checks

    def _vectors(self, vectors: Any, what: str) -> np.ndarray:
        try:
            arr = np.asarray(vectors)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{what} must be a numeric array: {e}") from None
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"{what} must be floating point (float32), got dtype {arr.dtype}")
        if arr.ndim == 1 and arr.size == self.dim:
            arr = arr.reshape(1, -1)
        if arr.ndim != 2:
            raise ValueError(f"{what} must be a 2-D array (n, {self.dim}), got shape {arr.shape}")
        if arr.shape[1] != self.dim:
            raise ValueError(
                f"{what} have dimension {arr.shape[1]}, but this index holds {self.dim}-d vectors"
            )
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(f"{what} contain NaN or infinite values")
        return arr

    @staticmethod
    def _id_array(ids: Any, what: str) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.ndim == 0:
            arr = arr.reshape(1)
        if arr.ndim != 1:
            raise ValueError(f"{what} must be a 1-D sequence of integers, got shape {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{what} must be integers, got dtype {arr.dtype}")
        if arr.size and arr.min() < 0:
            raise ValueError(f"{what} must be >= 0 (-1 marks a missing result), got {arr.min()}")
        return arr.astype(np.int64, copy=False)

    # ------------------------------------------------------------------ structures

    def _new_flat(self) -> Any:
        base = faiss.IndexFlatIP(self.dim) if self.metric == "ip" else faiss.IndexFlatL2(self.dim)
        return faiss.IndexIDMap2(base)

    def _new_hnsw(self) -> Any:
        index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, self._faiss_metric)
        index.hnsw.efConstruction = max(40, 2 * self.hnsw_m)
        index.hnsw.efSearch = self.ef_search
        return index

    def _new_ivf(self, train: np.ndarray) -> Any:
        n = len(train)
        # ~4 sqrt(n) cells, each with at least 39 training points (faiss's k-means minimum)
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
        quantizer = (faiss.IndexFlatIP(self.dim) if self.metric == "ip"
                     else faiss.IndexFlatL2(self.dim))
        index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, self._faiss_metric)
        sample = train
        if n > 256 * nlist:  # k-means needs no more than this
            pick = np.random.default_rng(0).choice(n, 256 * nlist, replace=False)
            sample = train[np.sort(pick)]
        index.train(sample)
        index.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]
        index.nprobe = min(nlist, self._nprobe or max(8, nlist // 16))
        self._trained_n = n
        return index

    def _add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        self._gpu_index = None
        if self.structure == "hnsw":
            start = len(self._pos_ids)
            self._index.add(vecs)
            self._pos_ids.extend(int(i) for i in ids)
            self._id_pos.update((int(i), start + j) for j, i in enumerate(ids))
        elif self.structure == "ivf" and self._index is None:
            self._index = self._new_ivf(vecs)
            self._index.add_with_ids(vecs, ids)
        else:
            self._index.add_with_ids(vecs, ids)
        self._ids.update(int(i) for i in ids)

    def _remove(self, ids: np.ndarray) -> None:
        self._gpu_index = None
        if self.structure == "hnsw":  # tombstones: a graph cannot drop nodes
            for i in ids:
                pos = self._id_pos.pop(int(i))
                self._pos_ids[pos] = -1
        else:
            self._index.remove_ids(ids)
        self._ids.difference_update(int(i) for i in ids)

    def _all(self) -> tuple[np.ndarray, np.ndarray]:
        """Every (id, vector) stored, for a rebuild."""
        ids = self.ids()
        if not len(ids):
            return ids, np.empty((0, self.dim), np.float32)
        if self.structure == "flat":
            stored = faiss.vector_to_array(self._index.id_map)
            vecs = self._index.index.reconstruct_n(0, self._index.ntotal)
            order = np.argsort(stored)
            return stored[order], vecs[order]
        if self.structure == "ivf":
            return ids, self._index.reconstruct_batch(ids)
        alive = np.asarray([p for p, i in enumerate(self._pos_ids) if i >= 0], np.int64)
        storage = faiss.downcast_index(self._index.storage)
        vecs = storage.reconstruct_n(0, storage.ntotal)[alive]
        return np.asarray([self._pos_ids[p] for p in alive], np.int64), vecs

    def _rebuild(self, structure: Literal["flat", "ivf", "hnsw"]) -> None:
        ids, vecs = self._all()
        self._ids, self._pos_ids, self._id_pos = set(), [], {}
        self._gpu_index = None
        self.structure = structure
        if structure == "flat":
            self._index = self._new_flat()
        elif structure == "hnsw":
            self._index = self._new_hnsw()
        else:
            self._index = None  # trained in _add on all the data
        if len(ids):
            self._add(ids, vecs)

    def _reshape_if_needed(self) -> None:
        n = len(self._ids)
        if self.kind == "auto":
            if self.structure == "flat" and n > self.exact_limit:
                self._rebuild("ivf")
                return
            if self.structure == "ivf" and n <= self.exact_limit // 2:
                self._rebuild("flat")
                return
        if self.structure == "ivf":
            if self._index is not None and n > RETRAIN_GROWTH * max(self._trained_n, 1):
                self._rebuild("ivf")
            elif n == 0:
                self._index = None  # retrain on whatever comes next
        elif self.structure == "hnsw":
            dead = len(self._pos_ids) - n
            if dead and dead > HNSW_MAX_DEAD * len(self._pos_ids):
                self._rebuild("hnsw")

    # ------------------------------------------------------------------ search

    def _search_hnsw(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        dead = len(self._pos_ids) - len(self._ids)
        params = faiss.SearchParametersHNSW(  # type: ignore[attr-defined]
            efSearch=max(self.ef_search, k))
        if dead:
            dead_pos = np.asarray([p for p, i in enumerate(self._pos_ids) if i < 0], np.int64)
            keep = faiss.IDSelectorNot(faiss.IDSelectorBatch(dead_pos))
            params.sel = keep
        d, pos = self._index.search(q, k, params=params)
        lookup = np.asarray(self._pos_ids + [-1], dtype=np.int64)  # pos -1 -> id -1
        return d, lookup[pos]

    def _searcher(self, k: int) -> Any:
        """The GPU copy of the index when one is allowed and works, else the CPU index."""
        if k > GPU_MAX_K or not self._gpu_allowed():
            return self._index
        if self.use_gpu == "auto" and len(self._ids) < GPU_MIN_VECTORS:
            return self._index
        if self._gpu_index is None:
            try:
                self._gpu_index = faiss.index_cpu_to_gpu(_gpu_resources(), 0, self._index)
            except RuntimeError:  # an index type the GPU build lacks: stay on CPU
                self._gpu_failed = True
                return self._index
        return self._gpu_index

    def _gpu_allowed(self) -> bool:
        if self.use_gpu is False or self._gpu_failed:
            return False
        return _num_gpus() > 0


_GPU_RES: Any = None


def _num_gpus() -> int:
    """GPUs faiss can use (0 with the faiss-cpu build)."""
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


def _gpu_resources() -> Any:
    """One StandardGpuResources per process (it holds scratch memory and streams)."""
    global _GPU_RES
    if _GPU_RES is None:
        _GPU_RES = faiss.StandardGpuResources()
    return _GPU_RES


def _first_duplicate(ids: np.ndarray) -> int:
    seen: set[int] = set()
    for i in ids.tolist():
        if i in seen:
            return i
        seen.add(i)
    return -1
