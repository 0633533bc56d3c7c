"""ToolRetriever: hybrid ranking, learned usage, decomposition, caching by catalogue hash;
ExampleRetriever: similarity, budget, order."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from contextwise.retrievers import tools as tools_mod
from contextwise.retrievers.examples import ExampleRetriever
from contextwise.retrievers.tools import (
    ToolRetriever,
    catalogue_hash,
    clauses,
    name_words,
    tool_document,
)

from contextwise.policy import Example
from contextwise.types import Tool


def tool(name: str, description: str, **params: str) -> Tool:
    props = {p: {"type": "string", "description": d} for p, d in params.items()}
    return Tool(name=name, description=description,
                parameters={"type": "object", "properties": props})


CATALOGUE = [
    tool("get_weather", "Current weather and forecast for a city.", city="city name"),
    tool("bookFlight", "Book a plane ticket between two airports.", origin="from", dest="to"),
    tool("send_email", "Send an email message to a recipient.", to="address", body="text"),
    tool("calculator", "Evaluate an arithmetic expression.", expression="math expression"),
    tool("stock_quote", "Latest share price of a listed company.", ticker="stock symbol"),
    tool("translate_text", "Translate text into another language.", target="language code"),
    tool("create_calendar_event", "Add a meeting to the user's calendar.", when="date"),
    tool("web_search", "Search the web and return result snippets.", q="search terms"),
    tool("acme_helper", "Internal helper for ACME workflows."),
    tool("convert_currency", "Convert an amount between currencies.", amount="number"),
]


class CountingEmbedder:
    """The real embedder, counting the texts it is asked to embed."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.name = inner.name
        self.dim = inner.dim
        self.texts: list[str] = []

    def embed(self, texts: list[str]) -> np.ndarray:
        self.texts.extend(texts)
        return self.inner.embed(texts)

    def embed_one(self, text: str) -> np.ndarray:
        return self.embed([text])[0]


@pytest.fixture
def counting(embedder: Any) -> CountingEmbedder:
    return CountingEmbedder(embedder)


@pytest.fixture(autouse=True)
def _fresh_memory_cache() -> None:
    tools_mod._BUILT.clear()


def names(results: list[tuple[Tool, float]]) -> list[str]:
    return [t.name for t, _ in results]


# --------------------------------------------------------------------------- documents


def test_tool_document_has_name_words_description_and_parameters() -> None:
    assert name_words("getWeatherForecast") == "get Weather Forecast"
    assert name_words("send_email-v2.beta") == "send email v2 beta"
    doc = tool_document(CATALOGUE[1])
    assert doc.startswith("book Flight: Book a plane ticket")
    assert "Parameters: origin (from); dest (to)" in doc


def test_catalogue_hash_ignores_order_but_not_content() -> None:
    a = catalogue_hash(CATALOGUE)
    assert catalogue_hash(list(reversed(CATALOGUE))) == a
    changed = [*CATALOGUE[:-1], tool("convert_currency", "Convert money.", amount="number")]
    assert catalogue_hash(changed) != a
    assert catalogue_hash(CATALOGUE, "other-embedder") != a


def test_clauses_split_multi_part_requests_only() -> None:
    assert clauses("What's the weather in Paris and also book me a flight to Rome") == [
        "What's the weather in Paris", "book me a flight to Rome"]
    assert clauses("Find cheap flights to Rome") == []
    assert clauses("Salt and pepper") == []


# --------------------------------------------------------------------------- ranking


def test_ranks_the_right_tool_first(embedder: Any) -> None:
    r = ToolRetriever(CATALOGUE, embedder=embedder)
    assert names(r.search("Will it rain in Paris tomorrow?", 3))[0] == "get_weather"
    assert names(r.search("calculate 17 * 23 + 4", 3))[0] == "calculator"
    assert names(r.search("What is Apple trading at right now?", 3))[0] == "stock_quote"
    top = r.search("put a meeting with Bob on my calendar for Monday", 5)
    assert top[0][0].name == "create_calendar_event"
    assert [s for _, s in top] == sorted((s for _, s in top), reverse=True)


def test_exact_identifier_is_found_lexically(embedder: Any) -> None:
    r = ToolRetriever(CATALOGUE, embedder=embedder)
    assert names(r.search("call convert_currency", 1)) == ["convert_currency"]
    assert names(r.search("acme", 1)) == ["acme_helper"]


def test_decomposition_surfaces_both_tools_of_a_two_part_request(embedder: Any) -> None:
    r = ToolRetriever(CATALOGUE, embedder=embedder)
    q = "What's the weather in Paris this weekend, and also book me a flight from Oslo to Paris"
    assert {"get_weather", "bookFlight"} <= set(names(r.search(q, 2)))


def test_search_bounds_and_errors(embedder: Any) -> None:
    r = ToolRetriever(CATALOGUE, embedder=embedder)
    assert len(r.search("weather", 50)) == len(CATALOGUE)
    with pytest.raises(ValueError, match="k must be"):
        r.search("weather", 0)
    with pytest.raises(ValueError, match="non-empty"):
        r.search("   ", 3)
    with pytest.raises(TypeError, match="list of queries"):
        r.search_many("weather", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lexical_weight"):
        ToolRetriever(CATALOGUE, embedder=embedder, lexical_weight=2)
    with pytest.raises(ValueError, match="duplicate tool name"):
        ToolRetriever([CATALOGUE[0], CATALOGUE[0]], embedder=embedder)
    with pytest.raises(ValueError, match=r"tools\[0\]"):
        ToolRetriever([{"type": "function", "function": {"name": "bad name!"}}],
                      embedder=embedder)
    assert ToolRetriever([], embedder=embedder).search("anything", 3) == []


def test_accepts_openai_tool_dicts(embedder: Any) -> None:
    r = ToolRetriever([t.to_openai() for t in CATALOGUE], embedder=embedder)
    assert names(r.search("forecast for Berlin", 1)) == ["get_weather"]


def test_scores_cover_the_whole_catalogue(embedder: Any) -> None:
    r = ToolRetriever(CATALOGUE, embedder=embedder, decompose=False)
    scores = r.scores("send a message to alice@example.com")
    assert set(scores) == {t.name for t in CATALOGUE}
    assert max(scores, key=scores.__getitem__) == "send_email"
    top = r.search("send a message to alice@example.com", 3)
    assert [pytest.approx(scores[t.name], abs=1e-4) for t, _ in top] == [s for _, s in top]


# --------------------------------------------------------------------------- usage


def test_learned_examples_lift_the_tool_they_led_to(embedder: Any) -> None:
    query = "my VPN token expired, get me a new one"
    r = ToolRetriever(CATALOGUE, embedder=embedder)
    assert names(r.search(query, 1)) != ["acme_helper"]
    assert r.learn("reset my VPN token", "acme_helper") is True
    assert r.learn("reset my VPN token", "acme_helper") is False  # already known
    r.learn("renew the VPN access token", "acme_helper")
    assert names(r.search(query, 1)) == ["acme_helper"]
    # the others still rank as before
    assert names(r.search("Will it rain in Paris tomorrow?", 1)) == ["get_weather"]
    assert r.examples == {"acme_helper": ["reset my VPN token", "renew the VPN access token"]}


def test_examples_in_the_constructor(embedder: Any) -> None:
    r = ToolRetriever(CATALOGUE, embedder=embedder,
                      examples={"acme_helper": ["reset my VPN token", "renew VPN access"]})
    assert names(r.search("my VPN token expired, get me a new one", 1)) == ["acme_helper"]
    with pytest.raises(ValueError, match="unknown tool 'nope'"):
        ToolRetriever(CATALOGUE, embedder=embedder, examples={"nope": ["q"]})
    with pytest.raises(TypeError, match="list of queries"):
        bad: Any = {"acme_helper": "q"}
        ToolRetriever(CATALOGUE, embedder=embedder, examples=bad)
    with pytest.raises(ValueError, match="non-empty"):
        r.learn("", "acme_helper")


def test_update_rebuilds_only_on_change_and_keeps_examples(counting: CountingEmbedder) -> None:
    r = ToolRetriever(CATALOGUE, embedder=counting, examples={"acme_helper": ["reset VPN"],
                                                              "calculator": ["2+2"]})
    assert r.rebuilds == 1
    assert r.update(list(reversed(CATALOGUE))) is False  # same content
    assert r.rebuilds == 1
    smaller = [t for t in CATALOGUE if t.name != "calculator"]
    assert r.update(smaller) is True
    assert r.examples == {"acme_helper": ["reset VPN"]}  # calculator's history left with it
    assert "calculator" not in names(r.search("2+2", 20))
    assert names(r.search("reset my VPN", 1)) == ["acme_helper"]


# --------------------------------------------------------------------------- caching


def test_same_catalogue_is_embedded_once_per_process(counting: CountingEmbedder) -> None:
    first = ToolRetriever(CATALOGUE, embedder=counting)
    docs = len(counting.texts)
    assert docs == len(CATALOGUE) and first.rebuilds == 1
    second = ToolRetriever(list(reversed(CATALOGUE)), embedder=counting)
    assert len(counting.texts) == docs and second.rebuilds == 0  # served from memory
    assert names(second.search("forecast for Rome", 1)) == ["get_weather"]
    changed = [*CATALOGUE, tool("play_music", "Play a song or playlist.")]
    third = ToolRetriever(changed, embedder=counting)
    assert third.rebuilds == 1  # a new hash: built again


def test_disk_cache_lets_another_process_skip_embedding(tmp_path, counting: CountingEmbedder
                                                        ) -> None:
    first = ToolRetriever(CATALOGUE, embedder=counting, cache_dir=tmp_path)
    files = list(tmp_path.glob("tools-*.cwv"))
    assert len(files) == 1 and first.rebuilds == 1
    tools_mod._BUILT.clear()  # what a new process starts with
    counting.texts.clear()
    second = ToolRetriever(CATALOGUE, embedder=counting, cache_dir=tmp_path)
    assert second.rebuilds == 0
    assert counting.texts == []  # no document was embedded
    q = "convert 20 dollars to euros"
    assert names(second.search(q, 3)) == names(first.search(q, 3))
    # a damaged cache file is rebuilt, not fatal
    files[0].write_bytes(b"garbage")
    tools_mod._BUILT.clear()
    third = ToolRetriever(CATALOGUE, embedder=counting, cache_dir=tmp_path)
    assert third.rebuilds == 1 and names(third.search(q, 1)) == ["convert_currency"]


@pytest.mark.slow
def test_ten_thousand_tools_build_and_search(embedder: Any) -> None:
    areas = ("weather", "flight", "email", "calendar", "stock", "invoice", "music", "photo",
             "recipe", "fitness")
    verbs = ("get", "list", "create", "delete", "update", "export", "share", "archive",
             "search", "sync")
    objs = ("report", "record", "entry", "item", "file", "note", "alert", "summary", "log",
            "batch")
    catalogue = [
        Tool(name=f"{verbs[i % 10]}_{areas[(i // 10) % 10]}_{objs[(i // 100) % 10]}_{i}",
             description=f"{verbs[i % 10].title()} a {areas[(i // 10) % 10]} "
                         f"{objs[(i // 100) % 10]} in workspace {i // 1000}.")
        for i in range(10_000)
    ]
    r = ToolRetriever(catalogue, embedder=embedder)
    assert len(r) == 10_000
    r.search("warm up", 5)
    top = r.search("delete a weather alert", 10)  # speed: benchmarks/tool_retrieval.py
    assert len(top) == 10
    assert all("weather" in t.name for t, _ in top[:3])
    assert any(t.name.startswith("delete_weather_alert") for t, _ in top)


# --------------------------------------------------------------------------- few-shot examples

POOL = [
    Example(input="What is the capital of France?", output="Paris."),
    Example(input="Convert 5 km to miles.", output="About 3.1 miles."),
    Example(input="Translate 'good morning' to Spanish.", output="Buenos días."),
    Example(input="What is the capital of Japan?", output="Tokyo."),
    Example(input="Summarize: " + "the meeting went long " * 40, output="It ran long."),
]


def test_examples_most_similar_last_within_limits(embedder: Any) -> None:
    r = ExampleRetriever(POOL, embedder=embedder)
    got = r.select("What is the capital of Italy?", max_examples=2, budget_tokens=1000)
    assert {e.output for e in got} == {"Paris.", "Tokyo."}
    one = r.select("What is the capital of Italy?", max_examples=1, budget_tokens=1000)
    assert got[-1] == one[0]  # the most similar comes last
    miles = r.select("How many miles is 10 km?", max_examples=3, budget_tokens=1000)
    assert miles[-1].output == "About 3.1 miles." and len(miles) == 3


def test_examples_respect_the_token_budget(embedder: Any) -> None:
    r = ExampleRetriever(POOL, embedder=embedder)
    got = r.select("Summarize the meeting notes", max_examples=3, budget_tokens=30)
    assert sum(r.tokens[POOL.index(e)] for e in got) <= 30
    assert POOL[4] not in got and got  # too big to fit: skipped, smaller ones fill in
    assert r.select("anything", max_examples=3, budget_tokens=0) == []
    assert r.select("anything", max_examples=0, budget_tokens=100) == []
    assert r.select("", max_examples=2, budget_tokens=1000) == [POOL[1], POOL[0]]


def test_example_retriever_input_errors(embedder: Any) -> None:
    with pytest.raises(ValueError, match=r"examples\[1\]\.output"):
        ExampleRetriever([{"input": "a", "output": "b"}, {"input": "a"}], embedder=embedder)
    r = ExampleRetriever([{"input": "hi", "output": "hello"}], embedder=embedder)
    with pytest.raises(ValueError, match=">= 0"):
        r.select("hi", max_examples=-1, budget_tokens=10)
    assert ExampleRetriever([], embedder=embedder).select("hi", max_examples=2,
                                                          budget_tokens=99) == []


def test_scores_follow_the_documented_formula(embedder: Any) -> None:
    examples = {"acme_helper": ["reset my VPN token", "renew VPN access", "ACME login broken"],
                "get_weather": ["is it sunny in Rome", "umbrella needed today?"]}
    r = ToolRetriever(CATALOGUE, embedder=embedder, lexical_weight=0.25, example_weight=0.6,
                      example_top_m=2, examples=examples)
    query = "my VPN token expired"
    got = r.scores(query)

    from contextwise.retrievers.lexical import BM25

    ordered = sorted(CATALOGUE, key=lambda t: t.name)
    docs = embedder.embed([tool_document(t) for t in ordered])
    q = embedder.embed_one(query)

    def z(x: np.ndarray) -> np.ndarray:
        return (x - x.mean()) / (x.std() + 1e-6)

    base = 0.75 * z(docs @ q) + 0.25 * z(BM25([tool_document(t) for t in ordered]).scores(query))
    past = {n: embedder.embed(qs) @ q for n, qs in examples.items()}
    every = np.concatenate([docs @ q, *past.values()])  # documents and past queries
    for i, t in enumerate(ordered):
        expected = base[i]
        if t.name in past:
            usage = np.sort(past[t.name])[-2:].mean()
            expected = 0.4 * base[i] + 0.6 * (usage - every.mean()) / (every.std() + 1e-6)
        assert got[t.name] == pytest.approx(expected, abs=1e-3), t.name
