"""Speculative decoding: tokens/s with and without it (prompt lookup; a self-draft).

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
- draft row: `speculative="draft"` with the self-draft (the model's first
  `draft_layers` of 30 layers, transformers' assistant_early_exit) on every
  other prompt of each workload (to keep the run short), compared with the
  plain runs of those same prompts; `draft_acceptance_rate`: accepted draft
  tokens / drafted tokens (drafting passes counted by a hook in this script),
  `draft_tokens_per_target_pass`: completion tokens / main-model passes;
- `*_tokens_per_s_*`: completion tokens / wall time summed over the workload
  (prefill included); `*_speedup`: prompt lookup over plain;
  `*_outputs_identical`: the replies (text, token counts, finish reason) equal
  on both paths for every prompt;
- static rows (`static_*`): the same prompts, one at a time, through two batching
  engines with `static_decode="on"` (the GPU default: KV-cache slots, 8 greedy
  tokens per decode call), one over the plain backend and one over the prompt
  lookup backend, where drafts are checked in verify passes
  (`StaticDecoder.verify`); `static_acceptance_rate`: accepted / drafted tokens,
  `static_verify_passes`: how many passes checked drafts.

Writes benchmarks/results/speculative.json. Takes about 6 minutes on 2 CPU cores.
"""

from __future__ import annotations

import time
from typing import Any

from contextwise.backends.local import LocalBackend
from rich.console import Console
from rich.table import Table

from benchmarks.common import chat, write_results
from contextwise.types import Reply

MAX_TOKENS = 96
SPECULATIVE_TOKENS = 10
DRAFT_EVERY = 2  # the draft row runs on prompts 0, 2, 4... of each workload

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


def _same(a: Reply, b: Reply) -> bool:
    return (a.message.content == b.message.content and a.usage == b.usage
            and a.finish_reason == b.finish_reason)


class _DraftPasses:
    """Counts the self-draft's forward passes: calls of the model while its
    config runs fewer layers than it has (transformers' early exit)."""

    def __init__(self, model: Any):
        self.full = model.config.num_hidden_layers
        self.config = model.config
        self.passes = 0
        model.register_forward_pre_hook(self._hook)

    def _hook(self, module: Any, args: Any) -> None:
        if self.config.num_hidden_layers < self.full:
            self.passes += 1


def _workload(prompts: list[str], plain: LocalBackend, lookup: LocalBackend,
              draft: LocalBackend, drafts: _DraftPasses) -> dict[str, Any]:
    seconds = {"plain": 0.0, "lookup": 0.0, "draft": 0.0, "plain_subset": 0.0}
    tokens = {"plain": 0, "lookup": 0, "draft": 0, "plain_subset": 0}
    identical = draft_identical = draft_prompts = 0
    accepted = target_passes = drafted = 0
    for i, text in enumerate(prompts):
        order = [("plain", plain), ("lookup", lookup)]
        with_draft = i % DRAFT_EVERY == 0
        if with_draft:
            order.append(("draft", draft))
        if i % 2:
            order.reverse()
        replies: dict[str, Reply] = {}
        walls: dict[str, float] = {}
        for name, backend in order:
            before = drafts.passes
            t0 = time.perf_counter()
            replies[name] = backend.generate([chat(text, MAX_TOKENS)])[0]
            walls[name] = time.perf_counter() - t0
            seconds[name] += walls[name]
            tokens[name] += replies[name].usage.completion_tokens
            if name == "draft":
                drafted += drafts.passes - before
        identical += _same(replies["plain"], replies["lookup"])
        assert replies["lookup"].trace.of("backend")[-1]["speculative"] == "prompt_lookup"
        if with_draft:
            record = replies["draft"].trace.of("backend")[-1]
            assert record["speculative"] == "draft"
            accepted += record["draft_accepted_tokens"]
            target_passes += record["draft_target_passes"]
            draft_prompts += 1
            draft_identical += _same(replies["plain"], replies["draft"])
            seconds["plain_subset"] += walls["plain"]
            tokens["plain_subset"] += replies["plain"].usage.completion_tokens
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
        "draft_prompts": draft_prompts,
        "tokens_per_s_plain_draft_prompts": round(tokens["plain_subset"]
                                                  / seconds["plain_subset"], 2),
        "tokens_per_s_draft": round(tokens["draft"] / seconds["draft"], 2),
        "draft_speedup": round((tokens["draft"] / seconds["draft"])
                               / (tokens["plain_subset"] / seconds["plain_subset"]), 3),
        "draft_acceptance_rate": round(accepted / drafted, 3) if drafted else 0.0,
        "draft_tokens_per_target_pass": round(tokens["draft"] / target_passes, 3),
        "draft_prompts_identical": draft_identical,
        "draft_outputs_identical": draft_identical == draft_prompts,
    }


def _static_workload(prompts: list[str], plain: LocalBackend,
                     lookup: LocalBackend) -> dict[str, Any]:
    from contextwise.backends.engine import BatchingEngine

    engines = {name: BatchingEngine(b, max_batch=4, static_decode="on", kv_cache_mb=256)
               for name, b in (("plain", plain), ("lookup", lookup))}
    for e in engines.values():  # warm-up
        e.generate([chat("Hi", 4)])
    before = {name: dict(e.stats()["static"]) for name, e in engines.items()}
    seconds = {"plain": 0.0, "lookup": 0.0}
    tokens = {"plain": 0, "lookup": 0}
    identical = 0
    for i, text in enumerate(prompts):
        order = ["plain", "lookup"] if i % 2 == 0 else ["lookup", "plain"]
        replies: dict[str, Reply] = {}
        for name in order:
            t0 = time.perf_counter()
            replies[name] = engines[name].generate([chat(text, MAX_TOKENS)])[0]
            seconds[name] += time.perf_counter() - t0
            tokens[name] += replies[name].usage.completion_tokens
        identical += _same(replies["plain"], replies["lookup"])
    after = {name: e.stats()["static"] for name, e in engines.items()}
    for e in engines.values():
        e.close()
    drafted = after["lookup"]["drafted"] - before["lookup"]["drafted"]
    accepted = after["lookup"]["accepted"] - before["lookup"]["accepted"]
    plain_tps, lookup_tps = (tokens[n] / seconds[n] for n in ("plain", "lookup"))
    return {
        "static_tokens_per_s_plain": round(plain_tps, 2),
        "static_tokens_per_s_prompt_lookup": round(lookup_tps, 2),
        "static_prompt_lookup_speedup": round(lookup_tps / plain_tps, 3),
        "static_acceptance_rate": round(accepted / drafted, 3) if drafted else 0.0,
        "static_verify_passes": after["lookup"]["verify_passes"]
        - before["lookup"]["verify_passes"],
        "static_prompts_identical": identical,
        "static_outputs_identical": identical == len(prompts),
    }


def main() -> dict[str, Any]:
    plain = LocalBackend(prefix_cache_mb=0)
    lookup = LocalBackend(loaded=plain.loaded, prefix_cache_mb=0, speculative="prompt_lookup",
                          speculative_tokens=SPECULATIVE_TOKENS)
    draft = LocalBackend(loaded=plain.loaded, prefix_cache_mb=0, speculative="draft",
                         speculative_tokens=SPECULATIVE_TOKENS)
    drafts = _DraftPasses(plain.model)
    for b in (plain, lookup, draft):  # warm-up
        b.generate([chat("Hi", 4)])
    quote = _workload(QUOTE, plain, lookup, draft, drafts)
    control = _workload(CONTROL, plain, lookup, draft, drafts)
    quote.update(_static_workload(QUOTE, plain, lookup))
    control.update(_static_workload(CONTROL, plain, lookup))
    metrics: dict[str, Any] = {
        "model": plain.model_name,
        "max_tokens": MAX_TOKENS,
        "speculative_tokens": SPECULATIVE_TOKENS,
        "draft_layers": draft.draft_layers,
        "model_layers": plain.model.config.num_hidden_layers,
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
    draft_table = Table(title=f"Self-draft (first {draft.draft_layers} of "
                              f"{metrics['model_layers']} layers) vs plain greedy, same prompts")
    for col in ("workload", "prompts", "plain tok/s", "draft tok/s", "speedup", "accept",
                "tok/pass", "same"):
        draft_table.add_column(col, justify="left" if col == "workload" else "right")
    for label, m in (("quotes its context", quote), ("control (open-ended)", control)):
        draft_table.add_row(label, str(m["draft_prompts"]),
                            f"{m['tokens_per_s_plain_draft_prompts']:.1f}",
                            f"{m['tokens_per_s_draft']:.1f}", f"{m['draft_speedup']:.2f}x",
                            f"{m['draft_acceptance_rate']:.0%}",
                            f"{m['draft_tokens_per_target_pass']:.2f}",
                            f"{m['draft_prompts_identical']}/{m['draft_prompts']}")
    static_table = Table(title="Static decoding (the GPU default), one request at a time: "
                               "prompt lookup in verify passes vs plain")
    for col in ("workload", "plain tok/s", "lookup tok/s", "speedup", "accept",
                "verify passes", "identical"):
        static_table.add_column(col, justify="left" if col == "workload" else "right")
    for label, m in (("quotes its context", quote), ("control (open-ended)", control)):
        static_table.add_row(label, f"{m['static_tokens_per_s_plain']:.1f}",
                             f"{m['static_tokens_per_s_prompt_lookup']:.1f}",
                             f"{m['static_prompt_lookup_speedup']:.2f}x",
                             f"{m['static_acceptance_rate']:.0%}",
                             str(m["static_verify_passes"]),
                             f"{m['static_prompts_identical']}/{m['prompts']}")
    console = Console()
    console.print(table)
    console.print(draft_table)
    console.print(static_table)
    console.print(f"wrote {path}")
    return metrics


if __name__ == "__main__":
    main()
