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
