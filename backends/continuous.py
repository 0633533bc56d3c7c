"""Continuous batching on a `StaticDecoder`: requests join and leave between decode chunks.

The batching engine hands its batchable requests (greedy, or sampled without a
seed; no grammar) here when static decoding is on. Each request gets a cache
slot and is prefilled (several at once, right-padded); then all active slots
decode together, `decode_steps` tokens per chunk when every row is greedy (one
CUDA graph replay on a GPU) or one token when a row samples. After each chunk
finished rows hand back their Reply at once and free their slot, and requests
that arrived meanwhile are admitted, so a long reply never holds the others
back and new requests do not wait for the batch to drain.

Prefix reuse (`reuse_prefixes`): a slot's cache still holds its last prompt's keys
and values after the row ends (`slot_prefixes.SlotPrefixes` tracks which tokens,
and forgets a slot once a pass writes it from position 0). A new row whose
prompt starts with whole 16-token blocks of what a slot holds prefills only the
rest: in place when the slot is its own, else after `StaticDecoder.copy_prefix`
from a slot no new row takes. New rows sharing more blocks among themselves get
that prefix prefilled once, in one row's slot, and copied to the others. The
keys and values reused are the ones the same tokens would get again (causal
attention: a position depends only on the tokens up to it).

Per row: its own max_tokens, stop strings, EOS, stream (`on_delta`, held back
like the single path so deltas add up to the final text) and cancellation
(its `on_delta` raising stops that row only). Tokens a chunk decodes past a
row's end are dropped. Greedy output equals the single path's except where
batching changes float rounding enough to flip a near-tie (in float32 on CPU
the tests see identical tokens).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from contextwise.backends.slot_prefixes import SlotPrefixes
from contextwise.backends.static_decode import MAX_VERIFY, Pending, ResumeFailed, StaticDecoder

if TYPE_CHECKING:
    from contextwise.backends.engine import _Request

__all__ = ["ContinuousRunner", "PromptLookup", "Row"]

_PREFILL_TOKENS = 16384  # padded prompt tokens per prefill pass at most (activation memory)
# cached positions one prefill pass after reused prefixes attends over at most: the torch
# kernels gather each slot's attention window
_PREFILL_READS = 4 * _PREFILL_TOKENS
_PREFIX_BLOCK = 16  # prompt prefixes are found, shared and reused in blocks of this many tokens


@dataclass(eq=False)
class Row:
    """One request being decoded in a batch: a padded generate's row (the engine) or a
    cache slot (here)."""

    req: _Request
    ids: list[int]  # the prompt
    max_new: int
    stop: tuple[str, ...] | None
    streamer: Any  # local._DeltaStreamer or None
    new: list[int] = field(default_factory=list)
    done: bool = False
    error: BaseException | None = None
    text: str | None = None  # `new` decoded, when decoded with other rows ending with it

    @property
    def n_prompt(self) -> int:
        return len(self.ids)

    def take(self, token: int, eos: int | None, stopped: Callable[[], bool]) -> bool:
        """Append `token` and stream it; True when the row ends with it: EOS, max_new,
        a stop string (`stopped()`, asked only when the row has stop strings), or its
        stream raised (`Cancelled`: the caller stopped listening; kept in `error`).
        `eos` None: no EOS token, so only the others end it."""
        self.new.append(token)
        stop = token == eos or len(self.new) >= self.max_new
        if not stop and self.stop is not None:
            stop = stopped()
        if self.streamer is not None:
            import torch

            try:
                self.streamer.put(torch.tensor([token]))
            except Exception as e:  # noqa: BLE001  (the row's caller gets it)
                self.error, stop = e, True
        return stop

    def take_many(self, tokens: list[int], eos: int | None,
                  stopped: Callable[[], bool]) -> tuple[int, bool]:
        """`take` for the tokens of a chunk, in order, up to the one the row ends with:
        (tokens taken, ended). A row with no stop strings and no stream takes them in
        one slice (a greedy chunk at 256 rows is 2,048 tokens)."""
        if self.stop is not None or self.streamer is not None:
            for i, token in enumerate(tokens):
                if self.take(token, eos, stopped):
                    return i + 1, True
            return len(tokens), False
        part = tokens[:self.max_new - len(self.new)]
        if eos in part:
            part = part[:part.index(eos) + 1]
        self.new.extend(part)
        return len(part), len(self.new) >= self.max_new or (bool(part) and part[-1] == eos)


@dataclass(eq=False)
class _Flight:
    """A greedy chunk launched on the GPU whose tokens its rows have not taken yet."""

    rows: list[_Active]  # the rows it decodes
    n: int  # slots 0..n-1
    pos: list[int]  # each slot's position at launch
    steps: int
    pending: Pending


@dataclass(eq=False, kw_only=True)
class _Active(Row):
    """A row in a cache slot."""

    slot: int
    temperature: float = 0.0
    top_p: float = 1.0
    min_new: int = 0  # generation_config.min_new_tokens: EOS masked until this many
    pos: int = 0  # position of the last token (the next step's input)
    lookup: PromptLookup | None = None  # speculative drafts (prompt lookup), made on need
    draft_k: int = 0  # tokens to draft next (adapts to what gets accepted)
    drafted: int = 0
    accepted: int = 0
    blocks: list[int] | None = None  # the prompt's block hashes (prefix reuse), once made

    @property
    def eos_banned(self) -> int:
        """How many of the next tokens may not be EOS (min_new_tokens)."""
        return max(0, self.min_new - len(self.new))


class PromptLookup:
    """Prompt-lookup drafts for one sequence: the tokens that followed the latest
    earlier occurrence of its last n tokens (n = 3, then 2, then 1). Each token's
    positions are indexed, so a lookup visits only where the last token occurred."""

    def __init__(self, seq: list[int], max_ngram: int = 3):
        self.seq: list[int] = []
        self.where: dict[int, list[int]] = {}
        self.max_ngram = max_ngram
        self.extend(seq)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            self.where.setdefault(token, []).append(len(self.seq))
            self.seq.append(token)

    def draft(self, k: int) -> list[int]:
        """Up to `k` tokens to propose after the sequence; [] when nothing matches."""
        seq = self.seq
        end = len(seq) - 1
        if end < 1 or k < 1:
            return []
        earlier = [i for i in self.where[seq[end]] if i < end]
        for n in range(min(self.max_ngram, end), 0, -1):
            tail = seq[end - n + 1:]
            for i in reversed(earlier):  # the latest occurrence first
                if i >= n - 1 and seq[i - n + 1:i + 1] == tail:
                    return seq[i + 1:i + 1 + k]
        return []


class ContinuousRunner:
    """Slots, admission and the decode loop for one `StaticDecoder`.

    A row's `min_new` is the model's generation_config.min_new_tokens when it was
    admitted (the benchmarks set it to make every reply the same length): EOS is
    masked until the row has that many tokens, as transformers does.
    `make_row(req, slot)` builds an `_Active` for a request (the engine knows the
    streamer and params); `complete(row, batch_size)` hands a finished row its
    Reply; `poll(limit)` returns up to `limit` newly queued batchable requests
    without waiting (it runs the others itself).

    `speculate` > 0 (prompt lookup): while at most `speculate_rows` rows decode and all
    are greedy, each row drafts up to `speculate` tokens copied from where its last
    tokens occurred earlier in its prompt or reply, and one verify pass checks every
    draft (`StaticDecoder.verify`); a row keeps the draft's tokens up to the first
    mismatch, plus the model's own next token, so the output is the greedy output.
    With no draft anywhere the chunk decodes as usual."""

    def __init__(self, decoder: StaticDecoder, eos: int, steps: int,
                 make_row: Callable[[Any, int], _Active],
                 complete: Callable[[_Active, int], None],
                 poll: Callable[[int], list[Any]],
                 decode_text: Callable[[list[int]], str],
                 speculate: int = 0, speculate_rows: int = 4, run_ahead: bool = True,
                 decode_texts: Callable[[list[list[int]]], list[str]] | None = None,
                 reuse_prefixes: bool = True):
        self.decoder = decoder
        self.eos = eos
        self.steps = max(1, int(steps))
        self.make_row = make_row
        self.complete = complete
        self.poll = poll
        self.decode_text = decode_text
        self.decode_texts = decode_texts  # many replies' texts in one call (rows ending together)
        self.free = list(range(decoder.slots))  # a heap: the lowest slots first, small buckets
        self.active: dict[int, _Active] = {}
        self.speculate = max(0, min(int(speculate), MAX_VERIFY - 1))
        self.speculate_rows = int(speculate_rows)
        self.run_ahead = bool(run_ahead)  # launch the next greedy chunk before taking one's
        self.stats: dict[str, Any] = {"chunks": 0, "resumed": 0, "tokens": 0, "admitted": 0,
                                      "largest_active": 0, "prefill_s": 0.0, "decode_s": 0.0,
                                      "prefill_tokens": 0}
        # what each slot's cache holds, for prompts that start the same way
        self.prefixes = SlotPrefixes(_PREFIX_BLOCK) if reuse_prefixes else None
        if self.prefixes is not None:
            self.stats.update(reused_tokens=0, copied_tokens=0)
        if self.speculate:
            self.stats.update(verify_passes=0, drafted=0, accepted=0)

    def fits(self, n_prompt: int, max_new: int) -> bool:
        return n_prompt + max_new <= self.decoder.max_len

    def run(self, reqs: list[Any]) -> None:
        """Serve `reqs` and whatever batchable arrives while they run, until no slot is busy.
        If a pass fails (out of memory, a CUDA error), every request in flight or waiting
        here gets that error and the slots are freed: the next batch starts clean.

        Greedy chunks run one ahead: while the GPU decodes chunk k + 1 (resumed from
        chunk k's last tokens, on the device) the host hands out chunk k's tokens,
        finishes rows and builds their replies. A row that ended in chunk k decodes
        chunk k + 1 for nothing (its tokens are dropped; its slot is taken again only
        after that chunk). The pipeline drains when requests wait for a free slot, when
        few enough rows are left to verify prompt-lookup drafts, or when every row ends
        in this chunk (by its max_tokens). `run_ahead=False` waits for each chunk's
        tokens instead."""
        pending: deque[Any] = deque(reqs)
        flight: _Flight | None = None
        try:
            while pending or self.active or flight is not None:
                if flight is None:
                    self._admit(pending)
                    if self.active:
                        flight = self._chunk()
                else:
                    ahead = self._resume(flight) if self._go_on(flight, pending) else None
                    self._land(flight)
                    flight = ahead
                if self.free:
                    pending.extend(self.poll(len(self.free) - len(pending)))
        except Exception as e:  # noqa: BLE001  (each caller gets it; the engine goes on)
            if self.prefixes is not None:  # a pass stopped midway: trust no slot's content
                self.prefixes.clear()
            for r in list(self.active.values()):
                r.error = e
                self._finish(r)
            for req in pending:
                if not req.future.done():
                    req.future.set_exception(e)

    # -- admission

    def _admit(self, pending: deque[Any]) -> None:
        rows: list[_Active] = []
        while pending and self.free:
            req = pending.popleft()
            slot = heapq.heappop(self.free)
            rows.append(self.make_row(req, slot))
        if not rows:
            return
        self.stats["admitted"] += len(rows)
        starts = self._reuse(rows)
        rows.sort(key=lambda r: r.n_prompt - starts[r])  # similar lengths: less padding
        group: list[_Active] = []
        longest = 0
        for row in rows:
            longest = max(longest, row.n_prompt)
            if group and ((len(group) + 1) * (row.n_prompt - starts[row]) > _PREFILL_TOKENS
                          or (len(group) + 1) * longest > _PREFILL_READS):
                self._prefill(group, starts)
                group, longest = [], row.n_prompt
            group.append(row)
        self._prefill(group, starts)

    def _prefill(self, rows: list[_Active], starts: dict[_Active, int]) -> None:
        t0 = time.perf_counter()
        try:
            logits = self.decoder.prefill([r.slot for r in rows], [r.ids for r in rows],
                                          [starts[r] for r in rows])
        except Exception as e:  # noqa: BLE001  (these callers get it; the others go on)
            for r in rows:
                if self.prefixes is not None:
                    self.prefixes.drop(r.slot)
                r.error = e
                self._finish(r)
            return
        banned = [i for i, r in enumerate(rows) if r.min_new > 0]
        if banned and self.eos is not None:
            logits = logits.clone()  # an inference tensor, made outside inference mode
            logits[banned, self.eos] = float("-inf")  # min_new_tokens, as transformers
        first = self._choose(rows, logits)
        self.stats["prefill_s"] += time.perf_counter() - t0
        for r, token in zip(rows, first, strict=True):
            self.stats["prefill_tokens"] += r.n_prompt - starts[r]
            if self.prefixes is not None:
                self.prefixes.put(r.slot, r.ids, r.blocks)
            self.active[r.slot] = r
            r.pos = r.n_prompt - 1  # the prompt's last token; the first new one comes next
            self._advance(r, [token])
        self.stats["largest_active"] = max(self.stats["largest_active"], len(self.active))

    # -- prefix reuse

    def _reuse(self, rows: list[_Active]) -> dict[_Active, int]:
        """Each new row's first position to prefill (0 without reuse). A row whose prompt
        starts with whole blocks of what a slot holds starts past them: in place when
        that slot is its own, else after a copy of those positions (from a slot no new
        row takes: its content stays). Rows sharing a longer prefix among themselves get
        it prefilled once, then copied (`_share`). At least the last prompt token is
        always prefilled (its logits give the first new token)."""
        starts = {r: 0 for r in rows}
        if self.prefixes is None:
            return starts
        # sources: a row's own slot, or one no new row takes (its content stays)
        kept = set(self.prefixes.held) - {r.slot for r in rows}
        copies = []
        try:
            for r in rows:
                r.blocks = self.prefixes.chain(r.ids)  # hashed once: matched, then put
                slot, n = self.prefixes.match(r.ids, allowed=kept | {r.slot}, prefer=r.slot,
                                              keys=r.blocks)
                n = min(n, r.n_prompt - 1)
                if slot is None or n < _PREFIX_BLOCK:
                    continue
                starts[r] = n
                if slot != r.slot:
                    copies.append((slot, r.slot, n))
            if copies:
                self.decoder.copy_prefix(copies)
            shared = self._share(rows, starts)
        except Exception:  # noqa: BLE001  (a failed copy costs the reuse, not the requests)
            for r in rows:
                self.prefixes.drop(r.slot)
            return {r: 0 for r in rows}
        # prefill_tokens + reused_tokens = the prompts' tokens
        self.stats["reused_tokens"] += sum(starts.values()) - shared
        self.stats["copied_tokens"] += sum(n for _, _, n in copies)
        return starts

    def _share(self, rows: list[_Active], starts: dict[_Active, int]) -> int:
        """Rows whose prompts share more whole blocks with each other than any of them
        reuses: the shared prefix is prefilled once (in the slot of the row holding the
        most of it) and copied into the others' slots, whose starts move past it.
        Returns the tokens prefilled for that."""
        b = _PREFIX_BLOCK
        if all(starts[r] >= (r.n_prompt - 1) // b * b for r in rows):
            return 0  # each row reuses every whole block it may already
        # ordered by their blocks' chained hashes, rows sharing a prefix end up adjacent
        ordered = sorted(rows, key=lambda r: r.blocks or [])
        runs: list[tuple[list[_Active], int]] = []
        for prev, cur in itertools.pairwise(ordered):
            limit = (min(prev.n_prompt, cur.n_prompt) - 1) // b  # a last token to compute
            k = _shared_blocks(prev.blocks or [], cur.blocks or [], limit)
            common = k * b
            if not k or prev.ids[:common] != cur.ids[:common]:  # or a hash collision
                continue
            if runs and runs[-1][0][-1] is prev:
                members, shared = runs[-1]
                runs[-1] = (members + [cur], min(shared, common))
            else:
                runs.append(([prev, cur], common))
        prefill: list[tuple[_Active, int, int]] = []  # (row, from, to)
        copies: list[tuple[int, int, int]] = []
        for members, shared in runs:
            gainers = [r for r in members if starts[r] < shared]
            if not gainers:
                continue
            leader = max(members, key=lambda r: starts[r])  # holds the most of it already
            if starts[leader] < shared:  # then every member gains: two at least
                prefill.append((leader, starts[leader], shared))
            for r in gainers:
                if r is not leader:
                    copies.append((leader.slot, r.slot, shared))
                starts[r] = shared
        if prefill:
            t0 = time.perf_counter()
            self.decoder.prefill([r.slot for r, _, _ in prefill],
                                 [r.ids[:end] for r, _, end in prefill],
                                 [start for _, start, _ in prefill])
            self.stats["prefill_s"] += time.perf_counter() - t0
        if copies:
            self.decoder.copy_prefix(copies)
            self.stats["copied_tokens"] += sum(n for _, _, n in copies)
        done = sum(end - start for _, start, end in prefill)
        self.stats["prefill_tokens"] += done
        return done

    # -- decoding

    def _chunk(self) -> _Flight | None:
        """Decode the active rows: a greedy chunk is launched and returned (its rows take
        its tokens in `_land`); a sampled or verify chunk runs to the end here (None)."""
        greedy = all(r.temperature <= 0 for r in self.active.values())
        if greedy and self.speculate and len(self.active) <= self.speculate_rows:
            drafts = self._drafts()
            if any(drafts.values()):
                self._verify_chunk(drafts)
                return None
        n = max(self.active) + 1
        self._dormant(n)
        tokens = [0] * n
        pos = [0] * n
        ban = [0] * n
        for slot, r in self.active.items():
            tokens[slot], pos[slot], ban[slot] = r.new[-1], r.pos, r.eos_banned
        if greedy:
            launched = self.decoder.launch(n, tokens, pos, steps=self.steps,
                                           ban_eos=ban if any(ban) else None)
            return _Flight(list(self.active.values()), n, pos, self.steps, launched)
        t0 = time.perf_counter()
        _, logits = self.decoder.decode(n, tokens, pos, steps=1,
                                        ban_eos=ban if any(ban) else None)
        self.stats["decode_s"] += time.perf_counter() - t0  # the host waits for the tokens
        self.stats["chunks"] += 1
        rows = list(self.active.values())
        picks = self._choose(rows, logits[[r.slot for r in rows]])
        for r, token in zip(rows, picks, strict=True):
            self._advance(r, [token])
        return None

    def _dormant(self, n: int) -> None:
        """A pass over slots 0..n-1 runs its whole bucket, and a slot there without an
        active row takes a token at position 0 (and on, when resumed): what it held is
        gone for prefix reuse."""
        if self.prefixes is None:
            return
        for slot in range(self.decoder.bucket(n)):
            if slot not in self.active:
                self.prefixes.drop(slot)

    def _go_on(self, flight: _Flight, pending: deque[Any]) -> bool:
        """Whether to launch the chunk after `flight` before taking its tokens: not when
        requests wait for a free slot, nor when the rows left are few enough for a verify
        pass (prompt lookup), nor when every row ends in `flight` (by its max_tokens)."""
        if not self.run_ahead or (pending and self.free):
            return False
        live = [r for r in flight.rows if not r.done]
        if self.speculate and len(live) <= self.speculate_rows:
            return False
        return any(len(r.new) + flight.steps < r.max_new for r in live)

    def _resume(self, flight: _Flight) -> _Flight | None:
        """The chunk after `flight` over the same slots, launched before its tokens are
        taken; None when the decoder can't resume (the next chunk starts from the host)."""
        pos = [p + flight.steps for p in flight.pos]
        try:
            launched = self.decoder.launch(flight.n, None, pos, steps=flight.steps)
        except ResumeFailed:
            return None
        self.stats["resumed"] += 1
        return _Flight(flight.rows, flight.n, pos, flight.steps, launched)

    def _land(self, flight: _Flight) -> None:
        """The rows of `flight` still decoding take its tokens."""
        t0 = time.perf_counter()
        chosen = flight.pending.tokens()
        self.stats["decode_s"] += time.perf_counter() - t0  # the host waits for the tokens
        self.stats["chunks"] += 1
        ended = [r for r in flight.rows if not r.done and self.active.get(r.slot) is r
                 and self._advance(r, chosen[r.slot], finish=False)]
        if len(ended) > 1 and self.decode_texts is not None:
            texts: Sequence[str | None]
            try:
                texts = self.decode_texts([r.new for r in ended])
            except Exception:  # noqa: BLE001  (each reply then decodes its own text)
                texts = [None] * len(ended)
            for r, text in zip(ended, texts, strict=True):
                r.text = text
        for r in ended:
            self._finish(r)

    def _drafts(self) -> dict[int, list[int]]:
        """Each active row's draft; every verified position must fit in its slot."""
        room = min(self.decoder.max_len - r.pos for r in self.active.values()) - 1
        out = {}
        for slot, r in self.active.items():
            if r.lookup is None:
                r.lookup, r.draft_k = PromptLookup(list(r.ids)), self.speculate
            r.lookup.extend(r.new[len(r.lookup.seq) - r.n_prompt:])
            k = min(r.draft_k, room, r.max_new - len(r.new) - 1)
            out[slot] = r.lookup.draft(k)
        return out

    def _verify_chunk(self, drafts: dict[int, list[int]]) -> None:
        """One verify pass: each row keeps its draft up to the first token the model would
        not have chosen, plus the model's choice there."""
        n = max(self.active) + 1
        self._dormant(n)
        t = 1 + max(len(d) for d in drafts.values())
        tokens = [[0] * t for _ in range(n)]
        pos = [0] * n
        ban = [0] * n
        for slot, r in self.active.items():
            d = drafts[slot]
            tokens[slot] = [r.new[-1], *d] + [0] * (t - 1 - len(d))
            pos[slot], ban[slot] = r.pos, r.eos_banned
        t0 = time.perf_counter()
        chosen = self.decoder.verify(n, tokens, pos, ban if any(ban) else None)
        self.stats["decode_s"] += time.perf_counter() - t0
        self.stats["chunks"] += 1
        self.stats["verify_passes"] += 1
        for r in list(self.active.values()):
            d, g = drafts[r.slot], chosen[r.slot]
            a = 0
            while a < len(d) and d[a] == g[a]:
                a += 1
            if d:  # as transformers adapts num_assistant_tokens
                r.draft_k = min(self.speculate, r.draft_k + 2) if a == len(d) else max(
                    1, r.draft_k - 1)
            r.drafted += len(d)
            r.accepted += a
            self.stats["drafted"] += len(d)
            self.stats["accepted"] += a
            self._advance(r, g[:a + 1])

    def _choose(self, rows: list[_Active], logits: Any) -> list[int]:
        """The next token of each row from its logits: argmax, or a sample for sampled rows."""
        import torch

        picks = logits.argmax(-1)
        sampled = [i for i, r in enumerate(rows) if r.temperature > 0]
        if sampled:
            idx = torch.tensor(sampled, device=logits.device)
            temps = torch.tensor([rows[i].temperature for i in sampled],
                                 device=logits.device, dtype=logits.dtype)
            top_p = torch.tensor([rows[i].top_p for i in sampled], device=logits.device,
                                 dtype=logits.dtype)
            picks[idx] = _sample(logits[idx] / temps[:, None], top_p)
        return picks.tolist()

    def _advance(self, r: _Active, tokens: list[int], finish: bool = True) -> bool:
        """Row `r` takes `tokens` (up to where it ends) and moves its position past them;
        whether it ended (then it is finished here, unless `finish` is False)."""
        taken, ended = r.take_many(tokens, self.eos, self._stopped(r))
        r.pos += taken
        self.stats["tokens"] += taken
        if ended and finish:
            self._finish(r)
        return ended

    def _stopped(self, r: _Active) -> Callable[[], bool]:
        """Whether row `r`'s text so far holds one of its stop strings."""
        return lambda: any(s in self.decode_text(r.new) for s in r.stop or ())

    def _finish(self, r: _Active) -> None:
        r.done = True
        if self.active.get(r.slot) is r:
            del self.active[r.slot]
        heapq.heappush(self.free, r.slot)
        self.complete(r, len(self.active) + 1)


def _sample(logits: Any, top_p: Any) -> Any:
    """One token per row from temperature-scaled `logits`, nucleus-filtered at `top_p`."""
    import torch

    probs = torch.softmax(logits.float(), dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    keep = (sorted_p.cumsum(-1) - sorted_p) < top_p[:, None].float()  # the top token always stays
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1)
    return order.gather(-1, choice)[:, 0]


def _shared_blocks(a: list[int], b: list[int], limit: int) -> int:
    """How many first blocks two prompts share, at most `limit`, from their chained block
    hashes (`SlotPrefixes.chain`): key k is equal only if every block up to k is, so a
    bisection compares a dozen keys, not every token."""
    lo, hi = 0, min(len(a), len(b), limit)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[mid - 1] == b[mid - 1]:
            lo = mid
        else:
            hi = mid - 1
    return lo
