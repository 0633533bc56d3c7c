"""SlotPrefixes: which prompt prefix each static-decoder slot holds, found by block."""

from __future__ import annotations

import pytest
from contextwise.backends.slot_prefixes import SlotPrefixes

SYSTEM = list(range(100, 140))  # 40 tokens: two whole blocks of 16, then 8 more


def test_the_longest_shared_prefix_is_found_past_the_whole_blocks() -> None:
    px = SlotPrefixes(block=16)
    px.put(0, SYSTEM + [1, 2, 3])
    px.put(1, SYSTEM[:20] + [9] * 30)
    px.put(2, [7] * 50)
    assert px.match(SYSTEM + [1, 2, 4]) == (0, 42)  # 2 blocks, then 10 tokens one by one
    assert px.match(SYSTEM[:20] + [9] * 12 + [5]) == (1, 32)
    assert px.match(SYSTEM[:17] + [0] * 20) == (0, 17)  # slot 0 and 1 share 1 block: lowest
    assert px.match([5] * 40) == (None, 0)
    assert px.match(SYSTEM[:15]) == (None, 0)  # not one whole block: nothing worth it
    assert len(px) == 3


def test_only_allowed_slots_count_and_the_preferred_one_wins_ties() -> None:
    px = SlotPrefixes(block=16)
    for slot in (3, 5, 9):
        px.put(slot, SYSTEM + [slot])
    assert px.match(SYSTEM + [0]) == (3, 40)
    assert px.match(SYSTEM + [0], prefer=9) == (9, 40)  # in place: no copy
    assert px.match(SYSTEM + [5], prefer=9) == (5, 41)  # a longer match beats the preferred
    assert px.match(SYSTEM + [0], allowed={9, 11}) == (9, 40)
    assert px.match(SYSTEM + [0], allowed=[11]) == (None, 0)


def test_a_slot_put_again_or_dropped_forgets_what_it_held() -> None:
    px = SlotPrefixes(block=16)
    px.put(0, SYSTEM)
    px.put(0, [1] * 32)
    assert px.match(SYSTEM) == (None, 0)
    assert px.match([1] * 40) == (0, 32)
    px.drop(0)
    px.drop(7)  # nothing held there: no error
    assert px.match([1] * 40) == (None, 0) and len(px) == 0
    px.put(1, SYSTEM)
    px.clear()
    assert px.match(SYSTEM) == (None, 0)


def test_many_slots_and_long_prompts_take_one_pass_over_the_blocks() -> None:
    px = SlotPrefixes(block=16)
    long = list(range(3000))
    for slot in range(256):
        px.put(slot, long[:1600 + slot])  # each one token longer than the one before
    slot, n = px.match(long, allowed=range(200, 256))
    assert slot >= 240 and n >= 1840 and px.held[slot][:n] == long[:n]  # 115 whole blocks
    assert px.match(long[:1650] + [-1], allowed=set(range(256)) - {50, 51}) == (52, 1650)


def test_a_bad_block_size_is_refused() -> None:
    with pytest.raises(ValueError, match="block must be >= 1"):
        SlotPrefixes(block=0)
