"""Structure-aware chunking, hybrid ranking and budgeted selection (retrievers/chunks.py)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from contextwise.retrievers.chunks import (
    Document,
    identifiers,
    rank_chunks,
    select_chunks,
    split_chunks,
)

from contextwise.tokens import count_text

UUIDS = [
    ("0b018c55-7fd0-48cc-ae57-2f3a45dd94bf", "714ff1e8-5513-4bb8-b9b0-2e573ff3254f"),
    ("cc21bc70-4a9e-4d95-922a-6a157fc817e4", "e5113bf5-7ad6-4461-9fa6-3319fc452575"),
    ("817b80e2-30fe-4a75-bccb-f408e1df2e63", "7ba60d90-7a9e-46cf-8afe-a7e5843a5c62"),
]


def kv_text(n: int = 40) -> tuple[str, list[tuple[str, str]]]:
    """A JSON object of n UUID pairs, one per line (the lost-in-the-middle format)."""
    import uuid

    rng = __import__("random").Random(7)
    pairs = [(str(uuid.UUID(int=rng.getrandbits(128))), str(uuid.UUID(int=rng.getrandbits(128))))
             for _ in range(n)]
    text = "{" + ",\n ".join(f'"{k}": "{v}"' for k, v in pairs) + "}"
    return text, pairs


def body_and_marker(out: str) -> tuple[str, str]:
    body, _, marker = out.rpartition("\n")
    return body, marker


# --------------------------------------------------------------------------- identifiers


def test_identifiers_find_uuids_numbers_and_codes() -> None:
    text = (f'Key: "{UUIDS[0][0]}", order ORD-1234 shipped 2024-05-01 to bob@example.com; '
            "3 items, total 45, field user_id, version v2.3.")
    ids = identifiers(text)
    assert UUIDS[0][0] in ids
    for expected in ("ord-1234", "2024-05-01", "bob@example.com", "45", "user_id", "v2.3"):
        assert expected in ids
    assert "3" not in ids and "items" not in ids  # single digits and words are not identifiers


def test_identifiers_are_deduplicated_in_order() -> None:
    assert identifiers("A1 then B22 then a1 again") == ["a1", "b22"]


# --------------------------------------------------------------------------- splitting


def test_json_object_splits_into_one_record_per_pair() -> None:
    text, pairs = kv_text(20)
    chunks = split_chunks(text)
    assert len(chunks) == 20
    for chunk, (k, v) in zip(chunks, pairs, strict=True):
        assert chunk.kind == "record"
        assert json.loads("{" + chunk.text + "}") == {k: v}  # valid-looking JSON


def test_json_array_splits_into_elements_and_descends_into_big_containers() -> None:
    rows = [{"id": i, "name": f"row {i}", "tags": ["a", "b"]} for i in range(30)]
    chunks = split_chunks(json.dumps(rows))
    assert [json.loads(c.text) for c in chunks] == rows
    # One huge key holding the list: split into its elements, not one giant record.
    wrapped = split_chunks(json.dumps({"count": 30, "results": rows}))
    assert len(wrapped) == 31
    assert wrapped[0].text == '"count": 30'
    assert wrapped[1].path == ("results", 0)


def test_json_with_an_unsplittable_long_string_is_cut_as_text() -> None:
    doc = Document(json.dumps({"title": "x", "body": "A sentence about things. " * 100}), 32)
    assert doc.json is None and len(doc.chunks) > 2
    assert all(c.kind != "record" for c in doc.chunks)


def test_text_splits_by_paragraph_line_and_sentence() -> None:
    log = "\n".join(f"12:00:{i:02d} INFO worker {i} processed batch {i * 7}" for i in range(40))
    doc = Document(log, target_tokens=48)
    assert doc.unit == "lines"
    assert all(c.kind == "line" for c in doc.chunks)
    assert all(c.tokens <= 48 for c in doc.chunks)
    assert "".join(c.text for c in doc.chunks).count("INFO") == 40  # nothing lost

    prose = ("The quarterly report was finished on time. " * 12).strip()
    doc = Document(prose + "\n\nShort closing paragraph.", target_tokens=32)
    kinds = {c.kind for c in doc.chunks}
    assert kinds == {"sentence", "paragraph"}
    assert all(c.tokens <= 48 for c in doc.chunks)  # within 1.5x the target


def test_a_very_long_sentence_falls_back_to_word_windows() -> None:
    words = " ".join(f"word{i}" for i in range(300))
    chunks = split_chunks(words, target_tokens=30)
    assert all(c.kind == "words" and c.tokens <= 30 for c in chunks)
    assert " ".join(c.text for c in chunks) == words


def test_bad_target_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="target_tokens"):
        Document("x", target_tokens=0)


# --------------------------------------------------------------------------- ranking


def test_exact_identifier_outranks_everything(embedder: Any) -> None:
    text, pairs = kv_text(30)
    chunks = split_chunks(text)
    key = pairs[17][0]
    scores = rank_chunks(f'Extract the value for key "{key}"', chunks, embedder=embedder)
    assert int(scores.argmax()) == 17
    others = [s for i, s in enumerate(scores) if i != 17]
    assert scores[17] - max(others) > 1.0  # not a near tie


def test_dense_part_finds_paraphrases(embedder: Any) -> None:
    chunks = ["The invoice was settled by bank transfer last week.",
              "Our kitten loves sleeping on the warm windowsill.",
              "The server restarted after the kernel upgrade."]
    scores = rank_chunks("which pet naps in the sun?", chunks, embedder=embedder)
    assert int(scores.argmax()) == 1  # no word in common: the embedding found it


def test_lexical_only_never_loads_an_embedder() -> None:
    def no_embedder() -> Any:
        raise AssertionError("the embedder must not be used")

    scores = rank_chunks("error E4021", ["all fine", "failed with E4021", "retrying"],
                         embedder=no_embedder, lexical_weight=1.0)
    assert int(scores.argmax()) == 1


def test_rank_edge_cases(embedder: Any) -> None:
    assert rank_chunks("anything", [], embedder=embedder).shape == (0,)
    assert not rank_chunks("   ", ["a", "b"], embedder=embedder).any()
    with pytest.raises(ValueError, match="lexical_weight"):
        rank_chunks("q", ["a"], embedder=embedder, lexical_weight=1.5)


# --------------------------------------------------------------------------- selection


def test_select_keeps_the_needle_in_order_within_budget(embedder: Any) -> None:
    text, pairs = kv_text(40)
    key, value = pairs[23]
    out = select_chunks(f'Key: "{key}"', text, 200, embedder=embedder)
    assert count_text(out) <= 200
    assert key in out and value in out
    body, marker = body_and_marker(out)
    kept = json.loads(body)  # the kept records are still a JSON object
    assert list(kept) == [k for k, _ in pairs if k in kept]  # original order
    m = re.fullmatch(r"\[\.\.\. (\d+) of 40 records omitted \.\.\.\]", marker)
    assert m and int(m.group(1)) == 40 - len(kept)


def test_select_returns_short_text_unchanged(embedder: Any) -> None:
    assert select_chunks("q", "short text", 50, embedder=embedder) == "short text"


def test_select_on_a_log_marks_gaps_and_counts_lines(embedder: Any) -> None:
    log = "\n".join(f"12:00:{i:02d} INFO worker {i} processed batch {i * 7}" for i in range(60))
    out = select_chunks("what happened to batch 147?", log, 80, embedder=embedder)
    assert count_text(out) <= 80
    assert "processed batch 147" in out
    assert "[...]" in out  # non-adjacent kept lines are separated by a gap marker
    assert re.search(r"\[\.\.\. \d+ of 60 lines omitted \.\.\.\]$", out)
    kept = [line for line in out.splitlines() if "INFO" in line]
    assert kept == sorted(kept)  # original order


def test_select_budget_smaller_than_any_chunk_gives_the_marker(embedder: Any) -> None:
    text, _ = kv_text(10)
    out = select_chunks("q", text, 14, embedder=embedder)
    assert out == "[... 10 of 10 records omitted ...]"
    with pytest.raises(ValueError, match="budget_tokens"):
        select_chunks("q", text, 0, embedder=embedder)
