"""KV-cache reuse across stateless API requests.

An OpenAI client resends the whole conversation every turn. After each answer the server keeps
the cache of (prompt + answer) keyed by its position keys (token ids, and (image hash, slot) for
image embeddings). A new request whose keys share a prefix with a kept entry starts from a copy
of that prefix, so a follow-up turn prefills only its new tokens. Entries are evicted least
recently used first once their tensors' total size passes `max_bytes`: the bound is measured
from the real KV tensors (their dtype, layers and heads), not assumed per token. An entry serves
only sequences with its own LoRA adapter gate (`LMState.adapter`): KV computed with the adapter on
(a conversation with an image) never continues one without, nor the other way round.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from vlchat.chat.engine import reusable_prefix
from vlchat.chat.prompt import PositionKey
from vlchat.model.batching import prefix_state, state_bytes
from vlchat.model.language import LMState


@dataclass
class CacheStats:
    entries: int
    tokens: int
    bytes: int  # the kept KV tensors' size
    max_bytes: int
    hits: int
    lookups: int


@dataclass
class Entry:
    keys: tuple[PositionKey, ...]
    state: LMState
    bytes: int  # state_bytes(state), measured once when stored


class PrefixCache:
    def __init__(self, max_bytes: int = 384 * 2**20) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[int, Entry] = OrderedDict()
        self.lock = threading.Lock()
        self.hits = self.lookups = 0
        self._next_id = 0

    def lookup(self, keys: list[PositionKey], adapter: bool) -> tuple[int, LMState]:
        """(reused length, a private copy of that many cached positions) for the longest match
        among entries computed with the same adapter gate."""
        with self.lock:
            self.lookups += 1
            best_id, best = None, 0
            for entry_id, entry in self.entries.items():
                common = reusable_prefix(list(entry.keys), keys) if entry.state.adapter == adapter else 0
                if common > best:
                    best_id, best = entry_id, common
            if best_id is None:
                return 0, LMState(adapter=adapter)
            self.hits += 1
            self.entries.move_to_end(best_id)
            return best, prefix_state(self.entries[best_id].state, best)

    def store(self, keys: list[PositionKey], state: LMState) -> None:
        """Keep a finished sequence's cache (the caller gives up `state`); prefixes of it go."""
        size = state_bytes(state)
        if not self.max_bytes or state.length != len(keys) or not keys or size > self.max_bytes:
            return
        new = Entry(tuple(keys), state, size)
        with self.lock:
            for entry_id, entry in list(self.entries.items()):
                # subsumed: the new entry answers every lookup the old one did
                if new.keys[: len(entry.keys)] == entry.keys and entry.state.adapter == state.adapter:
                    del self.entries[entry_id]
            self.entries[self._next_id] = new
            self._next_id += 1
            while sum(entry.bytes for entry in self.entries.values()) > self.max_bytes:
                self.entries.popitem(last=False)

    def stats(self) -> CacheStats:
        with self.lock:
            return CacheStats(
                len(self.entries),
                sum(len(entry.keys) for entry in self.entries.values()),
                sum(entry.bytes for entry in self.entries.values()),
                self.max_bytes,
                self.hits,
                self.lookups,
            )
