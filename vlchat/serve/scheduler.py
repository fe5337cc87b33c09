"""One worker thread owns the model; requests wait in a bounded FIFO queue and decode in a batch.

Admitted requests are prefilled together, each from its longest cached prefix (one forward over
several prompts' next chunks, `DecodeBatch.prefill`: requests that arrive together get their
first tokens together, not one after another), then join the running `BatchDecoder`
(vlchat/chat/batch.py, the loop `vlchat eval` runs too): every step picks each request's next
token with its own `SequenceDecoder` and feeds them all in one forward pass, so concurrent clients
share the cost of reading the weights (continuous batching, as vLLM and llama.cpp's server do).
Requests leave the batch when they finish, are cancelled (the client went away) or run past their
deadline. Beam search runs outside the batch, one search step per loop.

No request holds the others up for more than about a decode step: while other requests are
decoding, prompts are prefilled at most `PREFILL_CHUNK` padded positions per loop (chunked
prefill, as vLLM does), their images encoded with the chunk that holds them, and a beam search
advances one step per loop. Prompts arrive tokenized (serving.py tokenizes in the request's thread).

Events go back through each job's `emit` callback (called on the worker thread):
`Started` once the prompt is prefilled, `Delta`s of text, then `Finished` or `Failed`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL.Image import Image as PILImage

from vlchat.chat.batch import BatchDecoder
from vlchat.chat.beam import beam_search
from vlchat.chat.generate import Chunk, SequenceDecoder, TokenLogprob
from vlchat.chat.messages import Message
from vlchat.chat.prompt import (
    PositionKey,
    encode,
    first_slots,
    has_images,
    image_instructions,
    image_of,
    slot_ids,
)
from vlchat.chat.templates import Template
from vlchat.config import GenerationConfig
from vlchat.errors import VlchatError
from vlchat.model.batching import DecodeBatch
from vlchat.model.language import LMState
from vlchat.serve.prefix_cache import PrefixCache

log = logging.getLogger(__name__)
# Prompt positions prefilled per loop while other requests decode: on 2 CPU cores a 64-position
# chunk of the default model costs about as much as one decode step of a full batch.
PREFILL_CHUNK = 64
# Padded prompt positions prefilled in one forward when nothing decodes: new requests that arrive
# together are prefilled together (one forward reads the weights once for all of them).
PREFILL_BUDGET = 512


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
    logprobs: list[TokenLogprob] = field(default_factory=list)  # the answer tokens behind `text`


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
    keys: list[PositionKey] | None = None  # the prompt's position keys; None: tokenized by the worker
    # function calling / structured output (serve/tool_serving.py): tools rendered in the prompt,
    # the grammar each step is masked with, the format answers are parsed in (None: plain text)
    tools: tuple = ()
    structure: object | None = None
    call_format: object | None = None
    legacy_functions: bool = False

    def expired(self) -> bool:
        return time.monotonic() > self.deadline


@dataclass
class Active:
    job: Job
    keys: list[PositionKey]
    decoder: SequenceDecoder
    logits: torch.Tensor  # (1, V) at the row's current position
    shown_logprobs: int = 0  # decoder.logprobs already sent with a Delta


@dataclass
class Prefilling:
    """A prompt being prefilled chunk by chunk: `state` holds its first `done` positions."""

    job: Job
    keys: list[PositionKey]
    common: int  # positions that came from the prefix cache
    state: LMState
    done: int
    logits: torch.Tensor | None = None  # (1, V) after the last chunk


@dataclass
class Searching:
    """A beam search advanced one step per loop."""

    job: Job
    keys: list[PositionKey]
    state: LMState  # the prompt's cache (the search works on a fork)
    steps: Iterator[Chunk | None]


class QueueFull(Exception):
    pass


class ContextTooLong(VlchatError):
    code = "context_length_exceeded"


def check_window(prompt_tokens: int, max_new_tokens: int, window: int, tools: int = 0) -> None:
    if prompt_tokens + max_new_tokens > window:
        raise ContextTooLong(
            f"this conversation needs {prompt_tokens} prompt tokens + max_tokens "
            f"{max_new_tokens}, more than the context window of {window} tokens"
            + (f" (the {tools} tool definitions are part of the prompt)" if tools else "")
        )


class Scheduler:
    def __init__(self, chat, prefix_cache: PrefixCache | None = None, max_batch: int = 8, max_queue: int = 32) -> None:
        self.chat, self.lm = chat, chat.model.lm
        self.prefix_cache = prefix_cache or PrefixCache()
        self.max_batch = max_batch
        self.waiting: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.decoding: BatchDecoder[Active] = BatchDecoder(self.lm)
        self.prefilling: list[Prefilling] = []
        self.searching: list[Searching] = []
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

    @property
    def active(self) -> list[Active]:
        """The requests decoding now, in batch order."""
        return self.decoding.rows

    @property
    def running(self) -> int:
        return len(self.active) + len(self.prefilling) + len(self.searching)

    # --- the worker loop -----------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._admit()
                self._prefill_step()
                self._search_step()
                if self.active:
                    self._step()
            except Exception:  # a bug must not kill the worker: fail what is running, go on
                log.exception("scheduler step failed")
                for job in [a.job for a in self.active] + [w.job for w in self.prefilling + self.searching]:
                    job.emit(Failed("internal error while generating"))
                self.decoding, self.prefilling, self.searching = BatchDecoder(self.lm), [], []

    def _admit(self) -> None:
        """Take waiting jobs while there is room; they start prefilling (nothing is computed here
        but a prefix-cache lookup)."""
        while self.running < self.max_batch:
            try:
                job = self.waiting.get(timeout=0.05) if not self.running else self.waiting.get_nowait()
            except queue.Empty:
                break
            if job.cancelled.is_set():
                continue
            try:
                keys = job.keys if job.keys is not None else self._keys(job)
                # LoRA on only for conversations with an image or tools (model/language.py adapter_on)
                adapter = self.lm.adapter_on(has_images(keys), bool(job.tools))
                common, state = self.prefix_cache.lookup(keys, adapter)
            except VlchatError as error:
                job.emit(Failed(str(error), 400, getattr(error, "code", None)))
                continue
            except Exception:  # a bug: this request fails, the others go on
                log.exception("cannot start a request")
                job.emit(Failed("internal error while reading the prompt"))
                continue
            self.prefilling.append(Prefilling(job, keys, common, state, common))

    def _keys(self, job: Job) -> list[PositionKey]:
        """Tokenize a job that came without keys (serving.py tokenizes before submitting)."""
        model = self.chat.model
        instructed = model.reads_instructions
        keys = encode(
            job.template, job.messages, self.lm.tokenize, model.tokens_per_image, tools=job.tools, instructed=instructed
        )[0]
        check_window(len(keys), job.config.max_new_tokens, self.lm.context_window, len(job.tools))
        return keys

    def _prefill_step(self) -> None:
        """Advance prefilling prompts together: one forward over each one's next chunk (`_prefill_plan`
        picks them), then the prompts prefilled to their end start decoding."""
        self._drop_stopped_prefills()
        if not self.prefilling:
            return
        rows = []  # (work, chunk end, chunk embeddings (1, T_i, D))
        for work, end in self._prefill_plan(busy=bool(self.active or self.searching)):
            embeds = self._guarded(work, self._chunk_embeds, work, end)
            if embeds is not None:
                rows.append((work, end, embeds))
        if len(rows) > 1:
            try:
                self._prefill_rows(rows)
            except Exception:  # isolate a bad row: its own error then fails it alone
                log.exception("a batched prefill failed; prefilling its prompts one by one")
                for row in rows:
                    self._guarded(row[0], self._prefill_rows, [row])
        elif rows:
            self._guarded(rows[0][0], self._prefill_rows, rows)
        joining = []  # prompts prefilled to their end join the decode batch together (one restack)
        for work, _, _ in rows:
            if work in self.prefilling and work.done == len(work.keys):
                self.prefilling.remove(work)
                joining += self._started(work)
        self.decoding.join(joining)
        self.peak_batch = max(self.peak_batch, len(self.active))

    def _drop_stopped_prefills(self) -> None:
        """Cancelled prompts leave; prompts past their deadline fail with a timeout."""
        for work in list(self.prefilling):
            job = work.job
            if job.cancelled.is_set() or job.expired():
                self.prefilling.remove(work)
                if not job.cancelled.is_set():
                    job.emit(Failed(f"generation timed out after {job.timeout_s:g} s", 504, "timeout"))

    def _prefill_plan(self, busy: bool) -> list[tuple[Prefilling, int]]:
        """The prompts prefilled in this loop's forward and where each one's chunk ends. A prompt
        wants its next PREFILL_CHUNK positions while others decode, else all of it. One forward
        computes rows x width padded positions, at most the budget (PREFILL_CHUNK while others
        decode, else PREFILL_BUDGET; more only for the oldest prompt alone): of the widths the
        prompts want, the one that prefills the most real positions wins (ties: the wider), the
        prompts taken oldest first, each with up to that many positions."""
        cap = PREFILL_CHUNK if busy else None
        wanted = [self._chunk_end(work, cap or len(work.keys)) - work.done for work in self.prefilling]
        budget = max(wanted[0], PREFILL_CHUNK if busy else PREFILL_BUDGET)
        best: list[tuple[Prefilling, int]] = []
        for width in sorted(set(wanted), reverse=True):
            plan = self._plan_at(width, budget)
            if sum(end - work.done for work, end in plan) > sum(end - work.done for work, end in best):
                best = plan
        return best

    def _plan_at(self, width: int, budget: int) -> list[tuple[Prefilling, int]]:
        """Oldest first, the prompts whose chunks of up to `width` positions fit the budget (the
        oldest always: a chunk grows past `width` rather than split an image's slots)."""
        plan, widest = [], 0
        for work in self.prefilling:
            end = self._chunk_end(work, width)
            wider = max(widest, end - work.done)
            if not plan or (len(plan) + 1) * wider <= budget:
                plan.append((work, end))
                widest = wider
        return plan

    def _guarded(self, work: Prefilling, step: Callable[..., object], *args) -> object | None:
        """`step(*args)` for one prompt; if it fails, that request fails (and leaves) alone: None."""
        job = work.job
        try:
            return step(*args)
        except VlchatError as error:
            job.emit(Failed(str(error), 400, getattr(error, "code", None)))
        except Exception:  # a bug: this request fails, the others go on
            log.exception("cannot start a request")
            job.emit(Failed("internal error while reading the prompt"))
        if work in self.prefilling:
            self.prefilling.remove(work)
        return None

    @staticmethod
    def _chunk_end(work: Prefilling, size: int) -> int:
        """Where a chunk of about `size` positions from `work.done` ends: never inside an image's slots."""
        end = min(work.done + size, len(work.keys))
        while end < len(work.keys) and isinstance(work.keys[end], tuple) and work.keys[end][1] > 0:
            end += 1
        return end

    @torch.inference_mode()
    def _chunk_embeds(self, work: Prefilling, end: int) -> torch.Tensor:
        """(1, T, D) input embeddings of positions done..end; only the images whose first slot is
        in the chunk are encoded (for a model that reads instructions, with their message's text)."""
        chunk = work.keys[work.done : end]
        job, images = work.job, []
        for key in first_slots(chunk):
            if self.chat.model.reads_instructions:  # an instructed key (prompt.instructed_key)
                image = image_of(key)
                text = image_instructions(job.template, job.messages)[image]
                images.append(self.chat.image_embeddings(job.images[image], image, text)[1])
            else:
                images.append(self.chat.image_embeddings(job.images[key], key)[1])
        return self.chat.model.embed(torch.tensor([slot_ids(chunk)]), torch.stack(images) if images else None)

    @torch.inference_mode()
    def _prefill_rows(self, rows: list[tuple[Prefilling, int, torch.Tensor]]) -> None:
        """One forward over the rows' chunks; each row keeps its own batch-1 state. Alone, a row
        runs on its own state (no copy); together, the states are stacked left-padded
        (`DecodeBatch.prefill`) and cut back apart afterwards."""
        if len(rows) == 1:
            work, end, embeds = rows[0]
            work.logits, work.state = self.lm.prefill(embeds, work.state)
            work.done = end
            return
        batch = DecodeBatch.of([work.state for work, _, _ in rows])
        logits = batch.prefill(self.lm, [embeds for _, _, embeds in rows])  # (B, V)
        for i, (work, end, _) in enumerate(rows):
            work.logits, work.state, work.done = logits[i : i + 1], batch.row(i), end

    def _started(self, work: Prefilling) -> list[tuple[Active, LMState]]:
        """A prompt is in the cache: its row for the decode batch (to join), or start its beam search."""
        job = work.job
        job.usage = Usage(prompt_tokens=len(work.keys), cached_tokens=work.common)
        job.emit(Started(job.usage))
        if job.config.num_beams > 1:
            stops = job.template.stop + tuple(job.config.stop)
            steps = beam_search(
                self.lm,
                work.logits,
                work.state,
                job.config,
                stops,
                lambda: job.cancelled.is_set() or job.expired(),
                progress=True,
            )
            self.searching.append(Searching(job, work.keys, work.state, steps))
            return []
        try:
            constraint = job.structure.constraint(self.lm) if job.structure is not None else None
            decoder = SequenceDecoder(self.lm, job.config, job.template.stop, constraint)
        except VlchatError as error:
            job.emit(Failed(str(error), 400, getattr(error, "code", None)))
            return []
        return [(Active(job, work.keys, decoder, work.logits), work.state)]

    def _search_step(self) -> None:
        """One step of every running beam search."""
        for search in list(self.searching):
            try:
                done = self._search_advance(search)
            except Exception:
                log.exception("beam search failed")
                search.job.emit(Failed("internal error during beam search"))
                done = True
            if done:
                self.searching.remove(search)

    def _search_advance(self, search: Searching) -> bool:
        """Advance a search to its next step or its end; True once it is over."""
        job = search.job
        for chunk in search.steps:
            if job.expired():
                job.emit(Failed(f"generation timed out after {job.timeout_s:g} s", 504, "timeout"))
                return True
            if job.cancelled.is_set():
                return True
            if chunk is None:
                return False  # one step done; the others get their turn
            if chunk.text:
                job.emit(Delta(chunk.text))
            if chunk.result is not None:
                job.usage.completion_tokens = len(self.lm.tokenize(chunk.result.text)) if chunk.result.text else 0
                self.prefix_cache.store(search.keys, search.state)
                job.emit(Finished(chunk.finish_reason, job.usage))
                return True
        return True

    def _step(self) -> None:
        """Pick one token for every active row, retire finished rows, feed the rest together."""
        self.decoding.step(self._retire, self._pick_or_fail)

    def _pick_or_fail(self, active: Active) -> int | None:
        try:
            return self._pick(active)
        except Exception:  # a bug in one row's sampling fails that request only
            log.exception("sampling failed")
            active.job.emit(Failed("internal error while generating"))
            active.job.cancelled.set()
            return None

    def _pick(self, active: Active) -> int | None:
        """The row's next token, or None when it is done (finished, cancelled, timed out)."""
        job = active.job
        if job.cancelled.is_set():
            return None
        if job.expired():
            job.emit(Failed(f"generation timed out after {job.timeout_s:g} s", 504, "timeout"))
            job.cancelled.set()
            return None
        delta, token = active.decoder.step(active.logits)
        if delta:
            job.emit(Delta(delta, self._new_logprobs(active)))
        return None if active.decoder.finish_reason else token

    def _new_logprobs(self, active: Active) -> list[TokenLogprob]:
        """The logprobs of tokens picked since the last Delta (a held-back token's go with the text)."""
        new = active.decoder.logprobs[active.shown_logprobs :]
        active.shown_logprobs = len(active.decoder.logprobs)
        return new

    def _retire(self, active: Active, state: LMState) -> None:
        job, decoder = active.job, active.decoder
        if not job.cancelled.is_set():
            tail, logprobs = decoder.tail(), self._new_logprobs(active)
            if tail or logprobs:
                job.emit(Delta(tail, logprobs))
            job.usage.completion_tokens = len(decoder.stream.ids)
            job.emit(Finished(decoder.finish_reason or "length", job.usage))
        fed = active.keys + decoder.stream.ids
        self.prefix_cache.store(fed[: state.length], state)
