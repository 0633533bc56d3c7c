"""The shared embedder: the packaged MiniLM, normalized, memoized, the lean forward exact."""

from __future__ import annotations

import numpy as np
import pytest
from contextwise.retrievers.embedder import Embedder, resolve_embedder

from contextwise.errors import ModelNotFound


def test_matches_sentence_transformers_encode(embedder) -> None:
    texts = ["hi", "What is the weather in Lisbon tomorrow, and should I pack an umbrella?",
             "Book flight TP1351 for Ana"]
    ours = embedder.embed(texts)
    reference = embedder._model.encode(texts, normalize_embeddings=True)
    assert ours.shape == (3, 384) and ours.dtype == np.float32
    assert np.allclose((ours * reference).sum(-1), 1.0, atol=1e-4)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_fast_paths_are_exact(embedder) -> None:
    from contextwise.retrievers.fast_bert import FastBert

    assert embedder.backend == "onnxruntime"  # CPU, onnxruntime installed: the fastest path
    texts = ["short", "a much longer sentence so that the batch needs padding for the first"]
    reference = embedder._slow_forward(texts)
    assert np.allclose((embedder._forward(texts) * reference).sum(-1), 1.0, atol=1e-4)
    lean = FastBert(embedder._model[0].auto_model)
    tokens = embedder._model.tokenizer(texts, padding=True, return_tensors="pt")
    got = lean(tokens["input_ids"], tokens["attention_mask"]).numpy()
    assert np.allclose((got * reference).sum(-1), 1.0, atol=1e-4)


def test_memoized_and_order_preserved(embedder) -> None:
    a = embedder.embed(["alpha text", "beta text", "alpha text"])
    assert np.array_equal(a[0], a[2])
    assert np.array_equal(embedder.embed_one("beta text"), a[1])
    assert embedder.embed([]).shape == (0, 384)


def test_unknown_model_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ModelNotFound, match="neither"):
        resolve_embedder(str(tmp_path / "missing"))
    with pytest.raises(ModelNotFound):
        Embedder("no-such-embedder")
