"""The batch scheduler: concurrent jobs answer exactly as one session would, alone."""

from __future__ import annotations

import threading

import pytest

from vlchat.chat.engine import Chat
from vlchat.chat.messages import Message
from vlchat.chat.template_lookup import get_template
from vlchat.config import GenerationConfig
from vlchat.serve.scheduler import Delta, Failed, Finished, Job, QueueFull, Scheduler, Started


class Collector:
    def __init__(self) -> None:
        self.events, self.done = [], threading.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        if isinstance(event, (Finished, Failed)):
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, Delta))

    @property
    def logprobs(self) -> list:
        return [logprob for e in self.events if isinstance(e, Delta) for logprob in e.logprobs]


def job(text: str, config: GenerationConfig, collector: Collector, timeout_s: float = 60) -> Job:
    return Job([Message.text_message("user", text)], {}, get_template("chatml"), config, collector, timeout_s)


@pytest.fixture
def scheduler(tiny_model):
    scheduler = Scheduler(Chat(tiny_model), max_batch=4, max_queue=8)
    yield scheduler
    scheduler.close()


def solo_answer(tiny_model, text: str, config: GenerationConfig) -> str:
    session = Chat(tiny_model).session("chatml")
    session.ask(text)
    return "".join(chunk.text for chunk in session.stream(config))


def test_concurrent_jobs_match_solo_sessions(tiny_model, scheduler):
    config = GenerationConfig(max_new_tokens=12)
    questions = ["hello there", "what is in the image?", "a much longer question about many things"]
    collectors = [Collector() for _ in questions]
    for question, collector in zip(questions, collectors):
        scheduler.submit(job(question, config, collector))
    for question, collector in zip(questions, collectors):
        assert collector.done.wait(60)
        assert isinstance(collector.events[0], Started)
        assert collector.text == solo_answer(tiny_model, question, config)
        finished = collector.events[-1]
        assert finished.usage.completion_tokens == 12 and finished.finish_reason == "length"
    assert scheduler.peak_batch >= 2


def test_a_follow_up_reuses_the_cached_answer(scheduler):
    config = GenerationConfig(max_new_tokens=6)
    first = Collector()
    scheduler.submit(job("hi", config, first))
    assert first.done.wait(60)
    messages = [
        Message.text_message("user", "hi"),
        Message.text_message("assistant", first.text),
        Message.text_message("user", "and then?"),
    ]
    second = Collector()
    scheduler.submit(Job(messages, {}, get_template("chatml"), config, second))
    assert second.done.wait(60)
    assert second.events[0].usage.cached_tokens >= first.events[0].usage.prompt_tokens


def test_cancel_timeout_and_context_errors(scheduler):
    long = GenerationConfig(max_new_tokens=400, min_new_tokens=400)
    cancelled, timed_out, too_long = Collector(), Collector(), Collector()
    running = job("go", long, cancelled)
    scheduler.submit(running)
    scheduler.submit(job("go", long, timed_out, timeout_s=0.2))
    running.cancelled.set()
    assert timed_out.done.wait(60)
    assert timed_out.events[-1].status == 504
    scheduler.submit(job("x " * 600, GenerationConfig(max_new_tokens=8), too_long))
    assert too_long.done.wait(60)
    assert too_long.events[-1].status == 400 and too_long.events[-1].code == "context_length_exceeded"
    assert not any(isinstance(e, Finished) for e in cancelled.events)


def test_a_full_queue_refuses(tiny_model):
    scheduler = Scheduler(Chat(tiny_model), max_batch=1, max_queue=1)
    try:
        gate = threading.Event()
        blocker = Collector()
        blocker_job = job("go", GenerationConfig(max_new_tokens=400, min_new_tokens=400), blocker)
        scheduler.submit(blocker_job)
        while not blocker.events:
            gate.wait(0.01)
        scheduler.submit(job("wait", GenerationConfig(max_new_tokens=2), Collector()))
        with pytest.raises(QueueFull):
            scheduler.submit(job("refused", GenerationConfig(max_new_tokens=2), Collector()))
        blocker_job.cancelled.set()
    finally:
        scheduler.close()


def test_beam_search_stops_at_its_deadline(scheduler):
    collector = Collector()
    config = GenerationConfig(max_new_tokens=400, min_new_tokens=400, num_beams=4)
    scheduler.submit(job("go", config, collector, timeout_s=0.3))
    assert collector.done.wait(30)
    assert isinstance(collector.events[-1], Failed) and collector.events[-1].status == 504


def test_jobs_with_and_without_images_share_the_batch_and_answer_as_alone(tiny_adapted_model):
    """The LoRA adapter is on only for the jobs with an image, row by row in one batch."""
    from conftest import EXAMPLES

    from vlchat.chat.messages import Image, Text
    from vlchat.images import image_key, load_image

    image = load_image(EXAMPLES / "shapes.png")
    key, config = image_key(image), GenerationConfig(max_new_tokens=10)
    cases = [("hello there", False), ("what is in the image?", True), ("a longer question", False), ("why?", True)]
    scheduler = Scheduler(Chat(tiny_adapted_model), max_batch=4, max_queue=8)
    try:
        collectors = [Collector() for _ in cases]
        for (text, with_image), collector in zip(cases, collectors):
            parts = [Image(key), Text(text)] if with_image else [Text(text)]
            images = {key: image} if with_image else {}
            scheduler.submit(Job([Message("user", parts)], images, get_template("chatml"), config, collector))
        for (text, with_image), collector in zip(cases, collectors):
            assert collector.done.wait(60)
            session = Chat(tiny_adapted_model).session("chatml")
            if with_image:
                session.upload_img(image)
            session.ask(text)
            assert collector.text == "".join(chunk.text for chunk in session.stream(config))
        assert scheduler.peak_batch >= 2
        assert {entry.state.adapter for entry in scheduler.prefix_cache.entries.values()} == {True, False}
    finally:
        scheduler.close()


TOGETHER_CASES = [  # (question, with an image): prompts of different lengths, adapter on and off
    ("hello there", False),
    ("what is in the image?", True),
    ("a much longer question about many different things in the world", False),
    ("why?", True),
    ("ok", False),
]


def run_cases(chat, config: GenerationConfig, together: bool, others_decode: bool = False) -> list[Collector]:
    """TOGETHER_CASES through a fresh scheduler after one text request "hi" (whose cache entry,
    adapter off, is the text prompts' prefix, not the image ones'): `together`, all queued while
    the worker waits (in a blocker request's Started event), the blocker decoding on or cancelled
    first, as `others_decode` says; else one at a time."""
    from conftest import EXAMPLES

    from vlchat.chat.messages import Image, Text
    from vlchat.images import image_key, load_image

    image = load_image(EXAMPLES / "shapes.png")
    key = image_key(image)
    scheduler = Scheduler(chat, max_batch=8, max_queue=8)
    try:
        warm = Collector()
        scheduler.submit(job("hi", config, warm))
        assert warm.done.wait(60)
        holding, gate, blocker = threading.Event(), threading.Event(), Collector()

        def hold(event) -> None:
            if isinstance(event, Started):
                holding.set()
                gate.wait(30)
                if not others_decode:
                    blocker_job.cancelled.set()
            blocker(event)

        blocker_job = job("go", GenerationConfig(max_new_tokens=400, min_new_tokens=400), hold)
        if together:
            scheduler.submit(blocker_job)
            assert holding.wait(30)
            chat.forwards.clear()  # the blocker's own
        collectors = [Collector() for _ in TOGETHER_CASES]
        for (text, with_image), collector in zip(TOGETHER_CASES, collectors):
            parts = [Image(key), Text(text)] if with_image else [Text(text)]
            images = {key: image} if with_image else {}
            scheduler.submit(Job([Message("user", parts)], images, get_template("chatml"), config, collector))
            assert together or collector.done.wait(60)
        gate.set()
        for collector in collectors:
            assert collector.done.wait(60)
        blocker_job.cancelled.set()
    finally:
        scheduler.close()
    return collectors


@pytest.mark.parametrize("others_decode", [False, True])
def test_new_requests_are_prefilled_together_and_answer_as_alone(tiny_adapted_model, others_decode):
    """Requests that arrive together are prefilled in shared forwards (rows of different lengths,
    with and without an image, so with the adapter on and off, the text ones starting from the
    prefix cache and the image ones not) and each answers what it answers alone: the same tokens
    with the same log-probabilities. When nothing else decodes they share one forward; while
    another request decodes, each shared forward stays within PREFILL_CHUNK padded positions."""
    from vlchat.serve.scheduler import PREFILL_CHUNK

    lm = tiny_adapted_model.lm
    chat = Chat(tiny_adapted_model)
    chat.forwards = []  # (rows, positions) of every forward of the LM

    def counted(embeds, *args, **kwargs):
        chat.forwards.append(tuple(embeds.shape[:2]))
        return forward(embeds, *args, **kwargs)

    config = GenerationConfig(max_new_tokens=8, logprobs=True, top_logprobs=3)
    alone = run_cases(chat, config, together=False)
    forward, lm.forward_cached = lm.forward_cached, counted
    try:
        together = run_cases(chat, config, together=True, others_decode=others_decode)
    finally:
        del lm.forward_cached
    prefills = [(rows, positions) for rows, positions in chat.forwards if positions > 1]
    if others_decode:
        assert max(rows for rows, _ in prefills) >= 2
        assert all(rows * positions <= PREFILL_CHUNK for rows, positions in prefills if rows > 1)
    else:
        assert [rows for rows, _ in prefills] == [len(TOGETHER_CASES)]  # one forward for all the prompts
    for (_, with_image), solo, batched in zip(TOGETHER_CASES, alone, together):
        assert isinstance(batched.events[0], Started), batched.events
        assert (batched.events[0].usage.cached_tokens > 0) == (not with_image)
        assert batched.text == solo.text and len(solo.logprobs) == 8
        assert [lp.token_id for lp in batched.logprobs] == [lp.token_id for lp in solo.logprobs]
        for got, expected in zip(batched.logprobs, solo.logprobs):
            assert got.logprob == pytest.approx(expected.logprob, abs=1e-4)
            assert [t for t, _ in got.top] == [t for t, _ in expected.top]
