"""Prompt-lookup decoding: tokens/s with and without it, on replies that quote their context.

    python -m benchmarks.speculative

Two `LocalBackend`s share the one embedded model (SmolLM2-135M-Instruct): plain
greedy decoding and `speculative="prompt_lookup"` (drafts copied from n-gram
matches in the prompt, checked by the model in one forward pass). The prefix
KV cache is off on both, so only decoding differs. The backend is called
directly: the pipeline's stages would only add noise to a backend figure.

- quote workload (RAG-style): 8 prompts that carry a document or a tool result
  and ask to copy, extract or lightly rewrite parts of it;
- control workload: 4 open-ended questions with nothing to quote, to show when
  prompt lookup does not help (its drafts rarely match, and each failed draft
  costs a slightly wider forward pass);
- each prompt: greedy, max_tokens=96, plain and prompt lookup alternating (which
  goes first alternates too), after one warm-up call on each;
- `*_tokens_per_s_*`: completion tokens / wall time summed over the workload
  (prefill included); `*_speedup`: prompt lookup over plain;
  `*_outputs_identical`: the replies (text, token counts, finish reason) equal
  on both paths for every prompt.

Writes benchmarks/results/speculative.json. Takes about 3-4 minutes on 2 CPU cores.
"""

from __future__ import annotations

import time
from typing import Any

from contextwise.backends.local import LocalBackend
from rich.console import Console
from rich.table import Table

from benchmarks.common import write_results
from contextwise.types import Call, Message, Params, Reply

MAX_TOKENS = 96
SPECULATIVE_TOKENS = 10

ORDER = (
    '{"order_id": 4821, "customer": "Ada Lovelace", "email": "ada@example.org", '
    '"items": [{"sku": "A-12", "name": "Trail tent 2P", "qty": 1, "price": 249.0}, '
    '{"sku": "B-7", "name": "Down sleeping bag", "qty": 2, "price": 189.5}], '
    '"ship_to": "12 Analytical Row, London NW1 6XE", "status": "shipped", '
    '"carrier": "DHL", "tracking": "JD014600006281234567"}'
)
RHINE = (
    "The Rhine rises in the Swiss Alps and flows north through Germany before reaching the "
    "North Sea in the Netherlands. It is one of the busiest inland waterways in Europe, "
    "carrying coal, grain and containers between Basel and Rotterdam. Its middle section, "
    "the Rhine Gorge, is a UNESCO World Heritage Site known for its castles and vineyards. "
    "Floods in 1993 and 1995 led to a programme of new retention areas along the river."
)
RETURNS = (
    "Returns policy. Items can be returned within 30 days of delivery if they are unused and "
    "in their original packaging. Sale items can be exchanged but not refunded. Refunds go to "
    "the original payment method within 5 business days after the return arrives at our "
    "warehouse. Customers pay return shipping unless the item was faulty or wrong."
)
WEATHER = (
    '{"city": "Paris", "temperature_c": 18, "condition": "light rain", "humidity": 81, '
    '"wind_kph": 14, "forecast": [{"day": "Tue", "high_c": 20, "low_c": 12}, '
    '{"day": "Wed", "high_c": 23, "low_c": 14}]}'
)
CODE = (
    "def moving_average(values, window):\n"
    "    if window <= 0:\n"
    "        raise ValueError('window must be positive')\n"
    "    out = []\n"
    "    for i in range(len(values) - window + 1):\n"
    "        out.append(sum(values[i:i + window]) / window)\n"
    "    return out\n"
)

QUOTE = [
    f"Repeat the following JSON exactly:\n{ORDER}",
    (f"Tool result from get_order:\n{ORDER}\n\nList the items of this order with their sku, "
     "name and price, one per line."),
    f"Document:\n{RHINE}\n\nCopy the first two sentences of the document.",
    f"Document:\n{RHINE}\n\nRewrite the document as a bulleted list, one bullet per sentence.",
    f"Policy:\n{RETURNS}\n\nQuote the sentences of the policy that talk about refunds.",
    (f"Tool result from get_weather:\n{WEATHER}\n\nRepeat the tool result, then say whether to "
     "take an umbrella."),
    (f"Here is a function:\n```python\n{CODE}```\nAdd a docstring to it and return the whole "
     "function."),
    f"Context:\n{RETURNS}\n\n{RHINE}\n\nExtract the paragraph about returns, word for word.",
]
CONTROL = [
    "Why is the sky blue? Explain it to a ten-year-old.",
    "Write a short poem about autumn in the mountains.",
    "What are three good habits for staying healthy while working from home?",
    "Tell me a story about a robot who learns to paint.",
]


def _call(text: str) -> Call:
    return Call(messages=[Message(role="user", content=text)],
                params=Params(max_tokens=MAX_TOKENS, temperature=0))


def _same(a: Reply, b: Reply) -> bool:
    return (a.message.content == b.message.content and a.usage == b.usage
            and a.finish_reason == b.finish_reason)


def _workload(prompts: list[str], plain: LocalBackend, lookup: LocalBackend) -> dict[str, Any]:
    seconds = {"plain": 0.0, "lookup": 0.0}
    tokens = {"plain": 0, "lookup": 0}
    identical = 0
    for i, text in enumerate(prompts):
        order = [("plain", plain), ("lookup", lookup)]
        if i % 2:
            order.reverse()
        replies: dict[str, Reply] = {}
        for name, backend in order:
            t0 = time.perf_counter()
            replies[name] = backend.generate([_call(text)])[0]
            seconds[name] += time.perf_counter() - t0
            tokens[name] += replies[name].usage.completion_tokens
        identical += _same(replies["plain"], replies["lookup"])
        assert replies["lookup"].trace.of("backend")[-1]["speculative"] == "prompt_lookup"
    plain_tps = tokens["plain"] / seconds["plain"]
    lookup_tps = tokens["lookup"] / seconds["lookup"]
    return {
        "prompts": len(prompts),
        "completion_tokens": tokens["plain"],
        "tokens_per_s_plain": round(plain_tps, 2),
        "tokens_per_s_prompt_lookup": round(lookup_tps, 2),
        "prompt_lookup_speedup": round(lookup_tps / plain_tps, 3),
        "seconds_plain": round(seconds["plain"], 2),
        "seconds_prompt_lookup": round(seconds["lookup"], 2),
        "prompts_identical": identical,
        "outputs_identical": identical == len(prompts),
    }


def main() -> dict[str, Any]:
    plain = LocalBackend(prefix_cache_mb=0)
    lookup = LocalBackend(loaded=plain.loaded, prefix_cache_mb=0, speculative="prompt_lookup",
                          speculative_tokens=SPECULATIVE_TOKENS)
    for b in (plain, lookup):  # warm-up
        b.generate([Call(messages=[Message(role="user", content="Hi")],
                         params=Params(max_tokens=4))])
    quote = _workload(QUOTE, plain, lookup)
    control = _workload(CONTROL, plain, lookup)
    metrics: dict[str, Any] = {
        "model": plain.model_name,
        "max_tokens": MAX_TOKENS,
        "speculative_tokens": SPECULATIVE_TOKENS,
        **quote,
        **{f"control_{k}": v for k, v in control.items()},
    }
    path = write_results("speculative", metrics)

    table = Table(title=f"Prompt lookup vs plain greedy ({plain.model_name}, "
                        f"max_tokens={MAX_TOKENS}, CPU)")
    for col in ("workload", "prompts", "tokens", "plain tok/s", "lookup tok/s", "speedup",
                "identical"):
        table.add_column(col, justify="left" if col == "workload" else "right")
    for label, m in (("quotes its context", quote), ("control (open-ended)", control)):
        table.add_row(label, str(m["prompts"]), str(m["completion_tokens"]),
                      f"{m['tokens_per_s_plain']:.1f}", f"{m['tokens_per_s_prompt_lookup']:.1f}",
                      f"{m['prompt_lookup_speedup']:.2f}x",
                      f"{m['prompts_identical']}/{m['prompts']}")
    console = Console()
    console.print(table)
    console.print(f"wrote {path}")
    return metrics


if __name__ == "__main__":
    main()
