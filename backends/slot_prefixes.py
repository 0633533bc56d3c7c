"""Which token prefixes the static decoder's cache slots hold, found by block hashes.

    held = SlotPrefixes(block=16)
    held.put(3, prompt_ids)             # slot 3's keys/values are those of these tokens
    slot, n = held.match(new_ids, allowed={3, 7})  # the longest shared prefix, n tokens
    held.drop(3)                        # slot 3's cache was overwritten from position 0

Why: agent and chat traffic opens every request with the same system prompt (and
tool block), and a finished request's slot still holds its keys and values. A
new request whose prompt starts like a slot's content needs only the rest
prefilled: in place when it takes that slot, after a device copy of the shared
positions when another slot holds them (`continuous.ContinuousRunner`).

A slot's tokens are indexed by chained hashes of their whole `block`-token
blocks (as vLLM's automatic prefix caching keys its pages), so a lookup hashes
the new prompt once and walks its blocks, whatever the number of slots; the
match then extends token by token past the last shared whole block.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

__all__ = ["SlotPrefixes"]


class SlotPrefixes:
    """The token ids each slot's cache holds (positions 0..len-1), indexed by prefix."""

    def __init__(self, block: int = 16):
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        self.block = int(block)
        self.held: dict[int, list[int]] = {}
        self._keys: dict[int, list[int]] = {}  # slot -> its blocks' chained hashes
        self._slots: dict[int, set[int]] = {}  # chained hash -> slots holding that prefix

    def __len__(self) -> int:
        return len(self.held)

    def chain(self, tokens: Sequence[int]) -> list[int]:
        """The chained hash of each whole block of `tokens`: key k stands for the first
        (k + 1) * block tokens (`put` and `match` take them, to hash a prompt once)."""
        keys, h, b = [], 0, self.block
        for i in range(0, len(tokens) - b + 1, b):
            h = hash((h, tuple(tokens[i:i + b])))
            keys.append(h)
        return keys

    def put(self, slot: int, tokens: Sequence[int], keys: list[int] | None = None) -> None:
        """Slot `slot` holds the keys/values of `tokens` at positions 0..len-1 (`keys`:
        their `chain`, if made already)."""
        self.drop(slot)
        self.held[slot] = list(tokens)
        keys = self._keys[slot] = keys if keys is not None else self.chain(tokens)
        for key in keys:
            self._slots.setdefault(key, set()).add(slot)

    def drop(self, slot: int) -> None:
        """Slot `slot` holds nothing reusable any more."""
        self.held.pop(slot, None)
        for key in self._keys.pop(slot, ()):
            holders = self._slots[key]
            holders.discard(slot)
            if not holders:
                del self._slots[key]

    def clear(self) -> None:
        """No slot holds anything reusable."""
        self.held.clear()
        self._keys.clear()
        self._slots.clear()

    def match(self, tokens: Sequence[int], allowed: Collection[int] | None = None,
              prefer: int | None = None, keys: list[int] | None = None
              ) -> tuple[int | None, int]:
        """(slot, n): a slot (one of `allowed`; None: any) whose held tokens share the
        longest prefix with `tokens` (at least one whole block), and that prefix's
        length; (None, 0) when none shares a whole block. Among the slots sharing the
        most whole blocks, `prefer` (e.g. the slot the request takes: no copy) and the
        lowest three are compared token by token past those blocks. `keys`: the
        tokens' `chain`, if made already."""
        keys = keys if keys is not None else self.chain(tokens)
        ok = None if allowed is None else (
            allowed if isinstance(allowed, (set, frozenset)) else set(allowed))

        def holders(depth: int) -> set[int]:  # slots holding the first `depth` blocks
            held = self._slots.get(keys[depth - 1], set())
            return set(held) if ok is None else held & ok  # walks the smaller set

        # A slot holding block k's key holds every earlier one: the holders shrink with
        # depth, so the deepest block still held is found by bisection.
        lo, hi = 0, len(keys)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if holders(mid):
                lo = mid
            else:
                hi = mid - 1
        if lo == 0:
            return None, 0
        best = holders(lo)
        start = lo * self.block
        head = list(tokens[:start])
        candidates = ([prefer] if prefer in best else []) + sorted(best)[:3]
        slot, n = None, 0
        for s in candidates:
            held = self.held[s]
            if held[:start] != head:  # a hash collision, however unlikely
                continue
            i, end = start, min(len(held), len(tokens))
            while i < end and held[i] == tokens[i]:  # fewer than `block` more
                i += 1
            if i > n:
                slot, n = s, i
        return slot, n
