"""One worker thread owns the model; requests wait in a bounded FIFO queue and decode in a batch.

Each admitted request is prefilled alone (starting from the longest cached prefix), then joins
the running `DecodeBatch`: every step feeds one token for every active request in one forward
pass, so concurrent clients share the cost of reading the weights (continuous batching, as
vLLM and llama.cpp's server do). Requests leave the batch when they finish, are cancelled (the
client went away) or run past their deadline. Beam search runs alone, outside the batch.

Events go back through each job's `emit` callback (called on the worker thread):
`Started` once the prompt is prefilled, `Delta`s of text, then `Finished` or `Failed`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL.Image import Image as PILImage

from vlchat.chat.beam import beam_search
from vlchat.chat.generate import SequenceDecoder
from vlchat.chat.messages import Message
from vlchat.chat.prompt import PositionKey, encode, first_slots, has_images, slot_ids
from vlchat.chat.templates import Template
from vlchat.config import GenerationConfig
from vlchat.errors import VlchatError
from vlchat.model.batching import DecodeBatch
from vlchat.serve.prefix_cache import PrefixCache

log = logging.getLogger(__name__)


@dataclass
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    completion_tokens: int = 0


@dataclass
class Started:
    usage: Usage


@dataclass
class Delta:
    text: str


@dataclass
class Finished:
    finish_reason: str  # "stop" | "length"
    usage: Usage


@dataclass
class Failed:
    message: str
    status: int = 500
    code: str | None = None


Event = Started | Delta | Finished | Failed


@dataclass
class Job:
    messages: list[Message]
    images: dict[str, PILImage | Path]  # image key -> image (or its stored file), encoded on the worker
    template: Template
    config: GenerationConfig
    emit: Callable[[Event], None]
    timeout_s: float = 300.0
    cancelled: threading.Event = field(default_factory=threading.Event)
    usage: Usage = field(default_factory=Usage)
    deadline: float = 0.0


@dataclass
class Active:
    job: Job
    keys: list[PositionKey]
    decoder: SequenceDecoder
    logits: torch.Tensor  # (1, V) at the row's current position


class QueueFull(Exception):
    pass


class ContextTooLong(VlchatError):
    code = "context_length_exceeded"


class Scheduler:
    def __init__(self, chat, prefix_cache: PrefixCache | None = None, max_batch: int = 8, max_queue: int = 32) -> None:
        self.chat, self.lm = chat, chat.model.lm
        self.prefix_cache = prefix_cache or PrefixCache()
        self.max_batch = max_batch
        self.waiting: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.active: list[Active] = []
        self.batch = DecodeBatch()
        self.peak_batch = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vlchat-scheduler", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job; raises QueueFull when `max_queue` jobs are already waiting."""
        job.deadline = time.monotonic() + job.timeout_s
        try:
            self.waiting.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the server is busy: {self.waiting.maxsize} requests are already waiting") from None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    # --- the worker loop -----------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._admit()
                if self.active:
                    self._step()
            except Exception:  # a bug must not kill the worker: fail what is running, go on
                log.exception("scheduler step failed")
                for active in self.active:
                    active.job.emit(Failed("internal error while generating"))
                self.active, self.batch = [], DecodeBatch()

    def _admit(self) -> None:
        joined: list[tuple[Active, object]] = []
        while len(self.active) + len(joined) < self.max_batch:
            try:
                job = self.waiting.get(timeout=0.05) if not (self.active or joined) else self.waiting.get_nowait()
            except queue.Empty:
                break
            if job.cancelled.is_set():
                continue
            started = self._start(job)
            if started is not None:
                joined.append(started)
        if joined:
            self.batch = DecodeBatch.of(self.batch.rows() + [state for _, state in joined])
            self.active += [active for active, _ in joined]
            self.peak_batch = max(self.peak_batch, len(self.active))

    def _start(self, job: Job) -> tuple[Active, object] | None:
        """Prefill a job's prompt from the longest cached prefix; beam search runs to the end here."""
        try:
            keys, embeds, common, state = self._prefill_inputs(job)
            logits, state = self.lm.prefill(embeds, state)
        except VlchatError as error:
            job.emit(Failed(str(error), 400, getattr(error, "code", None)))
            return None
        except Exception:  # a bug: this request fails, the others go on
            log.exception("cannot start a request")
            job.emit(Failed("internal error while reading the prompt"))
            return None
        job.usage = Usage(prompt_tokens=len(keys), cached_tokens=common)
        job.emit(Started(job.usage))
        if job.config.num_beams > 1:
            try:
                self._beam(job, keys, logits, state)
            except Exception:
                log.exception("beam search failed")
                job.emit(Failed("internal error during beam search"))
            return None
        return Active(job, keys, SequenceDecoder(self.lm, job.config, job.template.stop), logits), state

    @torch.inference_mode()
    def _prefill_inputs(self, job: Job):
        model = self.chat.model
        keys = encode(job.template, job.messages, self.lm.tokenize, model.tokens_per_image)[0]
        window = self.lm.context_window
        if len(keys) + job.config.max_new_tokens > window:
            raise ContextTooLong(
                f"this conversation needs {len(keys)} prompt tokens + max_tokens "
                f"{job.config.max_new_tokens}, more than the context window of {window} tokens"
            )
        adapter = self.lm.adapter_on(has_images(keys))  # LoRA on only for conversations with an image
        common, state = self.prefix_cache.lookup(keys, adapter)
        rest = keys[common:]
        # only the images after the reused prefix are embedded
        images = [self.chat.image_embeddings(job.images[key], key)[1] for key in first_slots(rest)]
        embeds = model.embed(torch.tensor([slot_ids(rest)]), torch.stack(images) if images else None)
        return keys, embeds, common, state

    def _beam(self, job: Job, keys: list[PositionKey], logits: torch.Tensor, state) -> None:
        def interrupted() -> bool:
            return job.cancelled.is_set() or time.monotonic() > job.deadline

        stops = job.template.stop + tuple(job.config.stop)
        for chunk in beam_search(self.lm, logits, state, job.config, stops, interrupted):
            if time.monotonic() > job.deadline:
                job.emit(Failed(f"generation timed out after {job.timeout_s:g} s", 504, "timeout"))
                return
            if job.cancelled.is_set():
                return
            if chunk.text:
                job.emit(Delta(chunk.text))
            if chunk.result is not None:
                job.usage.completion_tokens = len(self.lm.tokenize(chunk.result.text)) if chunk.result.text else 0
                self.prefix_cache.store(keys, state)
                job.emit(Finished(chunk.finish_reason, job.usage))

    def _step(self) -> None:
        """Pick one token for every active row, retire finished rows, feed the rest together."""
        keep, tokens = [], []
        for row, active in enumerate(self.active):
            try:
                token = self._pick(active)
            except Exception:  # a bug in one row's sampling fails that request only
                log.exception("sampling failed")
                active.job.emit(Failed("internal error while generating"))
                active.job.cancelled.set()
                token = None
            if token is None:
                self._retire(row, active)
            else:
                keep.append(row)
                tokens.append(token)
        if len(keep) < len(self.active):
            self.batch = DecodeBatch.of([self.batch.row(i) for i in keep])
            self.active = [self.active[i] for i in keep]
        if self.active:
            logits = self.batch.decode(self.lm, torch.tensor(tokens))  # (B, V)
            for row, active in enumerate(self.active):
                active.logits = logits[row : row + 1]

    def _pick(self, active: Active) -> int | None:
        """The row's next token, or None when it is done (finished, cancelled, timed out)."""
        job = active.job
        if job.cancelled.is_set():
            return None
        if time.monotonic() > job.deadline:
            job.emit(Failed(f"generation timed out after {job.timeout_s:g} s", 504, "timeout"))
            job.cancelled.set()
            return None
        delta, token = active.decoder.step(active.logits)
        if delta:
            job.emit(Delta(delta))
        return None if active.decoder.finish_reason else token

    def _retire(self, row: int, active: Active) -> None:
        job, decoder = active.job, active.decoder
        if not job.cancelled.is_set():
            if tail := decoder.tail():
                job.emit(Delta(tail))
            job.usage.completion_tokens = len(decoder.stream.ids)
            job.emit(Finished(decoder.finish_reason or "length", job.usage))
        state = self.batch.row(row)
        fed = active.keys + decoder.stream.ids
        self.prefix_cache.store(fed[: state.length], state)
