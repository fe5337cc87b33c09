"""PrefixCache: longest-prefix lookup, private copies, subsumed entries, a budget in bytes."""

import torch

from vlchat.model.batching import layer_tensors, make_state, state_bytes
from vlchat.model.language import LMState
from vlchat.serve.prefix_cache import PrefixCache


def state_of(lm, ids, adapter=False):
    return lm.prefill(lm.embed(torch.tensor([ids])), LMState(adapter=adapter))[1]


def per_token(lm) -> int:
    return state_bytes(state_of(lm, [1]))


def test_lookup_returns_a_private_copy_of_the_longest_prefix(tiny_model):
    lm = tiny_model.lm
    cache = PrefixCache(max_bytes=100 * per_token(lm))
    cache.store([5, 6, 7, 8], state_of(lm, [5, 6, 7, 8]))
    cache.store([9, 9], state_of(lm, [9, 9]))
    common, state = cache.lookup([5, 6, 7, 30, 31], False)
    assert common == 3 and state.length == 3
    expected = lm.prefill(lm.embed(torch.tensor([[5, 6, 7, 30, 31]])))[0]
    got = lm.prefill(lm.embed(torch.tensor([[30, 31]])), state)[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert cache.lookup([5, 6, 7, 8, 1], False)[0] == 4  # the entry itself was not changed by the copy
    assert cache.lookup([1, 2], False)[0] == 0
    stats = cache.stats()
    assert (stats.entries, stats.tokens, stats.hits, stats.lookups) == (2, 6, 2, 3)
    assert stats.bytes == 6 * per_token(lm) and stats.max_bytes == 100 * per_token(lm)


def test_a_longer_conversation_replaces_its_prefix_and_old_entries_are_evicted(tiny_model):
    lm = tiny_model.lm
    cache = PrefixCache(max_bytes=8 * per_token(lm))
    cache.store([1, 2, 3], state_of(lm, [1, 2, 3]))
    cache.store([1, 2, 3, 4, 5], state_of(lm, [1, 2, 3, 4, 5]))  # the follow-up subsumes turn one
    assert cache.stats().entries == 1
    cache.store([7, 8, 9, 10], state_of(lm, [7, 8, 9, 10]))  # 5 + 4 > 8: the least recently used goes
    assert cache.stats().entries == 1 and cache.lookup([1, 2, 3, 4, 5, 6], False)[0] == 0
    assert cache.lookup([7, 8, 9, 10, 11], False)[0] == 4


def test_never_reuses_the_whole_prompt_or_half_an_image(tiny_model):
    lm, cache = tiny_model.lm, PrefixCache()
    keys = [1, 2, ("img", 0), ("img", 1), 3]
    cache.store(keys, state_of(lm, [1, 2, 4, 4, 3]))
    assert cache.lookup(keys, False)[0] == 4  # logits of the last position are needed
    assert cache.lookup([1, 2, ("img", 0), ("other", 1)], False)[0] == 2  # off the image's first slot


def test_never_reuses_kv_computed_with_the_other_adapter_gate(tiny_adapted_model):
    lm, cache = tiny_adapted_model.lm, PrefixCache()
    keys = [5, 6, 7, 8]
    cache.store(keys, state_of(lm, keys))  # a text conversation: adapter off
    common, state = cache.lookup(keys + [9], True)
    assert common == 0 and state.adapter and state.length == 0
    common, state = cache.lookup(keys + [9], False)
    assert common == 4 and not state.adapter
    cache.store(keys, state_of(lm, keys, adapter=True))  # the same tokens, adapter on: kept beside
    assert cache.stats().entries == 2
    common, state = cache.lookup(keys + [9], True)
    assert common == 4 and state.adapter
    expected = lm.prefill(lm.embed(torch.tensor([keys + [9]])), LMState(adapter=True))[0]
    torch.testing.assert_close(lm.prefill(lm.embed(torch.tensor([[9]])), state)[0], expected, atol=1e-5, rtol=0)
    off = lm.prefill(lm.embed(torch.tensor([keys + [9]])))[0]
    assert (off - expected).abs().max() > 0.1  # the two gates' caches do differ


def test_the_budget_is_measured_from_the_real_tensors(tiny_model):
    """The same positions in bfloat16 take half the bytes, so twice as many fit in the same budget."""
    lm = tiny_model.lm

    def bf16(state):
        return make_state([(k.bfloat16(), v.bfloat16()) for k, v in layer_tensors(state)], state.length)

    cache = PrefixCache(max_bytes=4 * per_token(lm))
    cache.store([1, 2, 3, 4, 5, 6, 7, 8], bf16(state_of(lm, [1, 2, 3, 4, 5, 6, 7, 8])))
    assert cache.stats().entries == 1 and cache.stats().bytes == 4 * per_token(lm)
    cache.store([9] * 5, state_of(lm, [9] * 5))  # float32, 5 tokens: over the budget alone, not kept
    assert cache.stats().tokens == 8
    assert PrefixCache(max_bytes=0).stats().bytes == 0
