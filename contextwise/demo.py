"""`contextwise demo`: a scripted multi-turn agent session on the embedded model.

A travel assistant with 30 tools (5 it needs, 25 it never calls). Each user turn: the model must call a
tool (grammar-constrained, so even a 135M model emits a valid call), the tool
runs for real (plain Python functions), and the model answers from the
result. Everything goes through the Pipeline, with session memory and the
ledger on; a table per turn and a summary are printed. The scripted turns
always reach the model (`cache="refresh"`: answered anew, then stored); at the
end a second user asks the first question, as is and reworded, and the
response cache answers both without the model.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from contextwise.pipeline import Pipeline
from contextwise.policy import Policy
from contextwise.report import print_report, summarize
from contextwise.types import Message, Reply, Tool

# --------------------------------------------------------------------------- the tools


def get_weather(city: str, unit: str = "celsius") -> dict[str, Any]:
    """Get the current weather for a city.

    Args:
        city: City name, e.g. Lisbon.
        unit: celsius or fahrenheit.
    """
    table = {"lisbon": 19, "paris": 11, "tokyo": 14, "new york": 7}
    c = table.get(city.strip().lower(), 15)
    temp = c if unit != "fahrenheit" else round(c * 9 / 5 + 32)
    return {"city": city, "temperature": temp, "unit": unit, "sky": "sunny"}


def search_flights(origin: str, destination: str, date: str) -> list[dict[str, Any]]:
    """Search direct flights between two cities on a date.

    Args:
        origin: Departure city.
        destination: Arrival city.
        date: Travel date as YYYY-MM-DD.
    """
    return [
        {"flight": "TP433", "from": origin, "to": destination, "date": date, "depart": "09:05",
         "price_eur": 142},
        {"flight": "AF1024", "from": origin, "to": destination, "date": date, "depart": "17:40",
         "price_eur": 168},
    ]


def convert_currency(amount: float, from_currency: str, to_currency: str) -> dict[str, Any]:
    """Convert an amount of money between currencies.

    Args:
        amount: The amount to convert.
        from_currency: ISO code to convert from, e.g. EUR.
        to_currency: ISO code to convert to, e.g. USD.
    """
    usd = {"EUR": 1.08, "USD": 1.0, "GBP": 1.27, "JPY": 0.0067}
    rate = usd.get(from_currency.upper(), 1.0) / usd.get(to_currency.upper(), 1.0)
    return {"amount": round(amount * rate, 2), "currency": to_currency.upper(), "rate": round(rate, 4)}


def find_restaurants(city: str, cuisine: str) -> list[dict[str, Any]]:
    """Find well-rated restaurants in a city.

    Args:
        city: City to search in.
        cuisine: Kind of food, e.g. seafood.
    """
    return [{"name": "Mar do Inferno", "city": city, "cuisine": cuisine, "rating": 4.6}]


def book_hotel(city: str, nights: int) -> dict[str, Any]:
    """Book a hotel room.

    Args:
        city: City of the hotel.
        nights: Number of nights.
    """
    return {"confirmation": "HX-2291", "city": city, "nights": nights}


# An agent rarely has only the tools a turn needs: 25 more, unrelated ones, so the
# tool-loadout stage has something to cut (they are never called).
OTHER_TOOLS = [
    ("get_stock_quote", "Latest price and daily change of a stock ticker."),
    ("translate_text", "Translate text between two languages."),
    ("send_email", "Send an email to an address with a subject and body."),
    ("create_calendar_event", "Add an event to the user's calendar."),
    ("search_news", "Search recent news articles on a topic."),
    ("get_sports_scores", "Live and final scores of sports matches."),
    ("define_word", "Dictionary definition of an English word."),
    ("solve_math", "Evaluate a math expression step by step."),
    ("get_recipe", "Find a cooking recipe by dish name."),
    ("track_package", "Track a parcel by its tracking number."),
    ("play_music", "Play a song or playlist on the user's speaker."),
    ("set_reminder", "Set a reminder at a given time."),
    ("search_jobs", "Search job listings by title and city."),
    ("get_crypto_price", "Current price of a cryptocurrency."),
    ("find_movie_showtimes", "Cinema showtimes for a movie near a city."),
    ("get_horoscope", "Daily horoscope for a zodiac sign."),
    ("check_spelling", "Check and correct the spelling of a text."),
    ("summarize_url", "Summarize the text of a web page."),
    ("search_wikipedia", "Search Wikipedia and return the first paragraph."),
    ("get_traffic", "Road traffic conditions between two places."),
    ("order_food_delivery", "Order food delivery from a restaurant."),
    ("find_pharmacy", "Find open pharmacies near an address."),
    ("get_air_quality", "Air quality index for a city."),
    ("calculate_mortgage", "Monthly payment of a mortgage."),
    ("search_podcasts", "Search podcasts by topic."),
]
TOOLS = [Tool.from_function(f) for f in
         (get_weather, search_flights, convert_currency, find_restaurants, book_hotel)] + [
    Tool(name=name, description=desc, parameters={
        "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]})
    for name, desc in OTHER_TOOLS
]

SYSTEM = "You are a concise travel assistant. Use the tools, then answer in one or two sentences."
SCRIPT: list[tuple[str, str | None]] = [  # (user turn, tool it needs or None)
    ("What's the weather in Lisbon today?", "get_weather"),
    ("Find me a flight from Paris to Lisbon on 2026-12-03.", "search_flights"),
    ("How much is 250 EUR in USD?", "convert_currency"),
    ("Recommend a seafood restaurant in Lisbon.", "find_restaurants"),
    ("Thanks! Summarize my trip plan in one sentence.", None),
]
MAX_TOKENS = 64


# --------------------------------------------------------------------------- running it


@dataclass
class Step:
    turn: int
    kind: str  # "tool call" or "answer"
    reply: Reply


def load_with_progress(pipeline: Pipeline, console: Console) -> float:
    """Build the backend (loads the model) under a progress bar; returns seconds."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    done = threading.Event()
    error: list[BaseException] = []

    def load() -> None:
        try:
            _ = pipeline.backend
        except BaseException as e:  # noqa: BLE001  (re-raised below, in the caller's thread)
            error.append(e)
        finally:
            done.set()

    t0 = time.perf_counter()
    threading.Thread(target=load, daemon=True).start()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        progress.add_task(f"loading {pipeline.policy.backend.model}", total=None)
        while not done.wait(0.1):
            pass
    if error:
        raise error[0]
    return time.perf_counter() - t0


def run_demo(policy: Policy | None = None, console: Console | None = None,
             turns: int | None = None) -> list[Step]:
    # Piped output (make, CI logs) gets a fixed width so the tables don't squash.
    console = console or Console(width=None if sys.stdout.isatty() else 120)
    pipeline = Pipeline(policy or Policy())
    load_s = load_with_progress(pipeline, console)
    console.print(f"model [bold]{pipeline.policy.backend.model}[/] ready in {load_s:.1f} s "
                  f"({getattr(pipeline.backend, 'loaded', None) and pipeline.backend.loaded.source})")
    session = "demo-" + uuid.uuid4().hex[:8]
    started = time.time()
    steps: list[Step] = []
    tools_by_name = {t.name: t for t in TOOLS}
    first = True
    for i, (user_text, tool_name) in enumerate(SCRIPT[:turns], start=1):
        new: list[dict[str, Any] | Message] = []
        if first:
            new.append({"role": "system", "content": SYSTEM})
            first = False
        new.append({"role": "user", "content": user_text})
        if tool_name:
            r = pipeline(new, tools=TOOLS, session=session, tool_choice=tool_name,
                         max_tokens=MAX_TOKENS, cache="refresh")
            steps.append(Step(i, "tool call", r))
            new = []
            for tc in r.tool_calls:
                result = tools_by_name[tc.name].run(tc.arguments)
                new.append({"role": "tool", "tool_call_id": tc.id, "name": tc.name,
                            "content": str(result)})
        r = pipeline(new, tools=TOOLS, session=session, tool_choice="none", max_tokens=MAX_TOKENS,
                     cache="refresh")
        steps.append(Step(i, "answer", r))
        _print_turn(console, i, user_text, steps[-2:] if tool_name else steps[-1:])

    _print_summary(console, steps)
    if pipeline.cache is not None and (turns is None or turns >= 1):
        _cache_encore(pipeline, console)
    if pipeline.ledger is not None:
        print_report(summarize(pipeline.ledger, pipeline.policy.pricing, since=started), console)
    return steps


CACHE_ASKS = ("What's the weather in Lisbon today?",   # the first turn, as is
              "How is the weather in Lisbon today?")   # reworded


def _cache_encore(pipeline: Pipeline, console: Console) -> None:
    """Another user opens with turn 1's question: the response cache answers."""
    table = Table(title="response cache: a second user asks the first question again",
                  title_justify="left")
    for col in ("question", "cache", "similarity", "latency", "model tokens", "reply"):
        table.add_column(col, no_wrap=col != "reply", overflow="ellipsis", max_width=44)
    tool = SCRIPT[0][1]
    for text in CACHE_ASKS:
        r = pipeline([{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
                     tools=TOOLS, session="demo-" + uuid.uuid4().hex[:8], tool_choice=tool,
                     max_tokens=MAX_TOKENS)
        rec = next((c for c in r.trace.of("cache") if "hit" in c), {})
        shown = ", ".join(f"{tc.name}({tc.arguments})" for tc in r.tool_calls) or r.text
        table.add_row(text, rec.get("hit") or "miss",
                      f"{rec['similarity']:.3f}" if rec.get("hit") else "-",
                      f"{r.latency_s * 1e3:.1f} ms",
                      str(r.usage.prompt_tokens + r.usage.completion_tokens), shown)
    console.print(table)


def _print_turn(console: Console, turn: int, user_text: str, steps: list[Step]) -> None:
    table = Table(title=f"turn {turn}: {user_text}", title_justify="left", expand=False)
    for col in ("step", "prompt tok", "output tok", "latency", "tok/s"):
        table.add_column(col, justify="right" if col != "step" else "left", no_wrap=True)
    table.add_column("tool calls / reply", no_wrap=True, overflow="ellipsis", max_width=60)
    for s in steps:
        r = s.reply
        shown = ", ".join(f"{tc.name}({tc.arguments})" for tc in r.tool_calls) or r.text
        if r.invalid_tool_calls:
            shown += f" [invalid: {r.invalid_tool_calls[0].error}]"
        table.add_row(s.kind, str(r.usage.prompt_tokens), str(r.usage.completion_tokens),
                      f"{r.latency_s:.2f} s", f"{r.usage.completion_tokens / r.latency_s:.1f}",
                      shown.replace("\n", " "))
    console.print(table)


def _print_summary(console: Console, steps: list[Step]) -> None:
    prompt = sum(s.reply.usage.prompt_tokens for s in steps)
    out = sum(s.reply.usage.completion_tokens for s in steps)
    secs = sum(s.reply.latency_s for s in steps)
    calls = sum(len(s.reply.tool_calls) for s in steps)
    invalid = sum(len(s.reply.invalid_tool_calls) for s in steps)
    table = Table(title="demo summary")
    table.add_column("model calls", justify="right")
    table.add_column("prompt tokens", justify="right")
    table.add_column("output tokens", justify="right")
    table.add_column("model time", justify="right")
    table.add_column("output tok/s", justify="right")
    table.add_column("tool calls", justify="right")
    table.add_column("invalid", justify="right")
    table.add_row(str(len(steps)), f"{prompt:,}", f"{out:,}", f"{secs:.1f} s",
                  f"{out / secs:.1f}" if secs else "-", str(calls), str(invalid))
    console.print(table)
