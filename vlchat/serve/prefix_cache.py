"""KV-cache reuse across stateless API requests.

An OpenAI client resends the whole conversation every turn. After each answer the server keeps
the cache of (prompt + answer) keyed by its position keys (token ids, and (image hash, slot) for
image embeddings). A new request whose keys share a prefix with a kept entry starts from a copy
of that prefix, so a follow-up turn prefills only its new tokens. Entries are evicted least
recently used first once their total size passes `max_tokens` positions. An entry serves only
sequences with its own LoRA adapter gate (`LMState.adapter`): KV computed with the adapter on
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
    bytes: int
    hits: int
    lookups: int


class PrefixCache:
    def __init__(self, max_tokens: int = 16384) -> None:
        self.max_tokens = max_tokens
        self.entries: OrderedDict[int, tuple[tuple[PositionKey, ...], LMState]] = OrderedDict()
        self.lock = threading.Lock()
        self.hits = self.lookups = 0
        self._next_id = 0

    def lookup(self, keys: list[PositionKey], adapter: bool) -> tuple[int, LMState]:
        """(reused length, a private copy of that many cached positions) for the longest match
        among entries computed with the same adapter gate."""
        with self.lock:
            self.lookups += 1
            best_id, best = None, 0
            for entry_id, (cached, state) in self.entries.items():
                common = reusable_prefix(list(cached), keys) if state.adapter == adapter else 0
                if common > best:
                    best_id, best = entry_id, common
            if best_id is None:
                return 0, LMState(adapter=adapter)
            self.hits += 1
            self.entries.move_to_end(best_id)
            return best, prefix_state(self.entries[best_id][1], best)

    def store(self, keys: list[PositionKey], state: LMState) -> None:
        """Keep a finished sequence's cache (the caller gives up `state`); prefixes of it go."""
        if not self.max_tokens or state.length != len(keys) or len(keys) > self.max_tokens:
            return
        entry = tuple(keys)
        with self.lock:
            for entry_id, (cached, kept) in list(self.entries.items()):
                # subsumed: the new entry answers every lookup the old one did
                if entry[: len(cached)] == cached and kept.adapter == state.adapter:
                    del self.entries[entry_id]
            self.entries[self._next_id] = (entry, state)
            self._next_id += 1
            while sum(len(k) for k, _ in self.entries.values()) > self.max_tokens:
                self.entries.popitem(last=False)

    def stats(self) -> CacheStats:
        with self.lock:
            return CacheStats(
                len(self.entries),
                sum(len(k) for k, _ in self.entries.values()),
                sum(state_bytes(s) for _, s in self.entries.values()),
                self.hits,
                self.lookups,
            )
