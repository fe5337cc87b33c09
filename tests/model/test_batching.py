"""DecodeBatch: rows of different lengths decode together exactly as they would alone."""

import torch

from vlchat.model.batching import DecodeBatch, prefix_state, state_bytes
from vlchat.model.language import LMState


def prefill(lm, ids):
    return lm.prefill(lm.embed(torch.tensor([ids])))


def test_batched_decode_matches_solo_decode(tiny_model):
    lm = tiny_model.lm
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    solo, states, logits = [], [], []
    for ids in prompts:
        first, state = prefill(lm, ids)
        states.append(state)
        logits.append(first)
        steps, s = [], prefill(lm, ids)[1]
        for token in (20, 21, 22):
            out, s = lm.decode(torch.tensor([token]), s)
            steps.append(out)
        solo.append(steps)
    batch = DecodeBatch.of(states)
    for step, token in enumerate((20, 21, 22)):
        out = batch.decode(lm, torch.tensor([token] * 3))  # (3, V)
        for row in range(3):
            torch.testing.assert_close(out[row : row + 1], solo[row][step], atol=1e-4, rtol=1e-4)
    assert batch.lengths == [6, 9, 4]


def test_row_cuts_back_to_a_solo_state_that_continues_correctly(tiny_model):
    lm = tiny_model.lm
    (_, a), (_, b) = prefill(lm, [5, 6]), prefill(lm, [7, 8, 9, 10])
    batch = DecodeBatch.of([a, b])
    batch.decode(lm, torch.tensor([30, 31]))
    row = batch.row(0)
    assert row.length == 3 and row.cache.get_seq_length() == 3
    expected, _ = lm.decode(torch.tensor([40]), prefill(lm, [5, 6, 30])[1])
    got, _ = lm.decode(torch.tensor([40]), row)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_prefix_state_copies_and_counts_bytes(tiny_model):
    lm = tiny_model.lm
    _, state = prefill(lm, [5, 6, 7, 8])
    head = prefix_state(state, 2)
    assert head.length == 2 and head.cache.get_seq_length() == 2
    assert state_bytes(head) * 2 == state_bytes(state)
    expected, _ = prefill(lm, [5, 6, 9])
    got, _ = lm.prefill(lm.embed(torch.tensor([[9]])), head)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert state.length == 4  # the source is untouched


def test_rows_with_and_without_the_adapter_decode_together_as_alone(tiny_adapted_model):
    """Sequences with an image (adapter on) and without (off) in one batch: each row as alone."""
    lm = tiny_adapted_model.lm
    prompts = [([5, 6, 7], True), ([8, 9, 10, 11, 12, 13], False), ([14], True), ([15, 16], False)]

    def start(ids, adapter):
        return lm.prefill(lm.embed(torch.tensor([ids])), LMState(adapter=adapter))[1]

    solo = []
    for ids, adapter in prompts:
        steps, state = [], start(ids, adapter)
        for token in (20, 21, 22):
            out, state = lm.decode(torch.tensor([token]), state)
            steps.append(out)
        solo.append(steps)
    batch = DecodeBatch.of([start(ids, adapter) for ids, adapter in prompts])
    assert batch.adapters == [True, False, True, False]
    for step, token in enumerate((20, 21, 22)):
        out = batch.decode(lm, torch.tensor([token] * 4))  # (4, V)
        for row in range(4):
            torch.testing.assert_close(out[row : row + 1], solo[row][step], atol=1e-5, rtol=0)
    assert [row.adapter for row in batch.rows()] == [True, False, True, False]
    assert prefix_state(batch.row(0), 2).adapter and prefix_state(batch.row(0), 0).adapter
    assert DecodeBatch.of([batch.row(2), batch.row(1)]).adapters == [True, False]


def test_batched_prefill_of_chunks_matches_solo_prefill(tiny_adapted_model):
    """Prompts of different lengths (one with no cache yet, gates mixed) prefill their next chunks
    of different lengths in one forward: each row's logits and its cut-back state (the padding
    hole inside the row dropped) are what the prompt alone gives."""
    lm = tiny_adapted_model.lm
    cases = [([5, 6, 7], [20, 21], True), ([], [22, 23, 24, 25, 26], False), ([8, 9, 10, 11, 12], [27], False)]

    def start(ids, adapter):
        return (
            lm.prefill(lm.embed(torch.tensor([ids])), LMState(adapter=adapter))[1] if ids else LMState(adapter=adapter)
        )

    batch = DecodeBatch.of([start(head, adapter) for head, _, adapter in cases])
    assert batch.mask.shape == (3, 5) and batch.mask[1].sum() == 0
    logits = batch.prefill(lm, [lm.embed(torch.tensor([chunk])) for _, chunk, _ in cases])  # (3, V)
    assert batch.lengths == [5, 5, 6] and batch.mask.shape == (3, 10)
    for i, (head, chunk, adapter) in enumerate(cases):
        solo, solo_state = lm.prefill(lm.embed(torch.tensor([head + chunk])), LMState(adapter=adapter))
        torch.testing.assert_close(logits[i : i + 1], solo, atol=1e-5, rtol=0)
        row = batch.row(i)
        assert row.length == len(head + chunk) and row.cache.get_seq_length() == row.length and row.adapter == adapter
        expected, _ = lm.decode(torch.tensor([40]), solo_state)
        got, _ = lm.decode(torch.tensor([40]), row)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_an_empty_batch_of_new_prompts_prefills_without_a_cache(tiny_model):
    lm = tiny_model.lm
    batch = DecodeBatch.of([LMState(), LMState()])
    assert batch.state.cache is None and batch.mask.shape == (2, 0)
    logits = batch.prefill(lm, [lm.embed(torch.tensor([[5, 6, 7]])), lm.embed(torch.tensor([[8]]))])
    torch.testing.assert_close(logits[1:], prefill(lm, [8])[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[:1], prefill(lm, [5, 6, 7])[0], atol=1e-5, rtol=0)
