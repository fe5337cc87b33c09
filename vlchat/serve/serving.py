"""The serving logic behind the HTTP routes: OpenAI requests -> scheduler jobs -> responses.

Routes (api.py) only translate HTTP. Here: the model loads in the background (503 until it is
ready), requests become `Job`s (messages, decoded images, generation settings), and the
scheduler's events, which arrive on its worker thread, are handed to the asyncio loop through a
queue. A client that goes away cancels its job, so its row leaves the decode batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from vlchat.chat.generate import TokenLogprob, check_for_model, token_bytes
from vlchat.chat.messages import Image, Message, Text
from vlchat.chat.prompt import encode
from vlchat.chat.template_lookup import get_template
from vlchat.chat.tools import get_format
from vlchat.config import GenerationConfig
from vlchat.errors import VlchatError
from vlchat.images import DEFAULT_MAX_PIXELS, image_key
from vlchat.serve import protocol as p
from vlchat.serve.image_source import ImageInputError, ImagePolicy, resolve_image
from vlchat.serve.prefix_cache import PrefixCache
from vlchat.serve.scheduler import ContextTooLong, Delta, Failed, Finished, Job, QueueFull, Scheduler, check_window
from vlchat.serve.tool_serving import DeltaStream, ToolRequestError, message_fields, response, tool_request

log = logging.getLogger(__name__)
API_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}  # GenerationConfig -> request
Disconnected = Callable[[], Awaitable[bool]]

# Request fields beyond the declared ones (protocol.py): those that cannot change the answer are
# accepted and ignored; the function-calling fields are handled by the tool-calling work and are
# accepted here; OpenAI fields that would change the answer and are not implemented get a 400.
HARMLESS_FIELDS = ("user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key")
FUNCTION_CALLING_FIELDS = (
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "functions",
    "function_call",
)
UNSUPPORTED_FIELDS = {
    "audio": "audio output is not supported",
    "modalities": 'only text output is supported (modalities must be ["text"])',
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "this model has no reasoning mode",
    "verbosity": "verbosity is not supported",
    "web_search_options": "web search is not supported",
}


@dataclass(frozen=True)
class ServeConfig:
    """Server limits and policies; every field is a `vlchat serve` option."""

    model: str = "default"  # a preset name or a model config file
    api_key: str | None = None
    image_dir: Path | None = None
    allow_remote_images: bool = False
    max_body_mb: float = 32.0
    max_image_mb: float = 20.0
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_batch: int = 8
    max_queue: int = 32
    timeout_s: float = 300.0
    prefix_cache_mb: float = 384.0  # ~16k positions of the default model in bfloat16, ~8k in float32
    default_max_tokens: int = 256
    home: Path | None = None  # the conversation store's folder; None: $VLCHAT_HOME or ~/.vlchat
    agent_tools: tuple[str, ...] = ("read_text", "image_labels", "zoom")  # what vlchat_tools may name

    def __post_init__(self) -> None:
        for name in ("max_body_mb", "max_image_mb", "max_batch", "max_queue", "timeout_s", "default_max_tokens"):
            if getattr(self, name) <= 0:
                raise VlchatError(f"{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.prefix_cache_mb < 2**40:
            raise VlchatError(f"prefix-cache-mb must be >= 0, got {self.prefix_cache_mb}")

    @property
    def image_policy(self) -> ImagePolicy:
        return ImagePolicy(
            image_dir=self.image_dir,
            allow_remote=self.allow_remote_images,
            max_bytes=int(self.max_image_mb * 2**20),
            max_pixels=self.max_image_pixels,
        )


class ApiError(Exception):
    """An error the API reports as OpenAI-style JSON with `status`."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        405: "invalid_request_error",
        409: "conflict_error",
        413: "invalid_request_error",
        415: "invalid_request_error",
        422: "invalid_request_error",
        429: "rate_limit_error",
        503: "service_unavailable_error",
        504: "timeout_error",
    }

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        message = message.encode("utf-8", "replace").decode("utf-8")  # echoed input may hold surrogates
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error")
        return p.ErrorResponse(
            error=p.ErrorBody(message=self.message, type=kind, param=self.param, code=self.code)
        ).model_dump()


@dataclass
class Prompt:
    """A conversation ready for the scheduler."""

    messages: list[Message]
    images: dict = field(default_factory=dict)  # image key -> PIL image


class ChatService:
    def __init__(
        self, config: ServeConfig, load_chat: Callable[[], object], model_name: str, template: str = "chatml"
    ) -> None:
        self.config = config
        self.model_id = f"vlchat-{model_name}"
        self.model_template = template  # the model's conversation template, known before it loads
        self.chat = None
        self.scheduler: Scheduler | None = None
        self._token_text: dict[int, tuple[str, list[int]]] = {}  # token id -> (text, bytes), for logprobs
        self.load_error: str | None = None
        self._loader = threading.Thread(target=self._load, args=(load_chat,), daemon=True, name="vlchat-load")
        self._loader.start()

    def _load(self, load_chat: Callable[[], object]) -> None:
        try:
            self.chat = load_chat()
            self.scheduler = Scheduler(
                self.chat,
                PrefixCache(int(self.config.prefix_cache_mb * 2**20)),
                self.config.max_batch,
                self.config.max_queue,
            )
            log.info("model %s loaded", self.model_id)
        except Exception as error:  # reported by /health and every request (503), never a crash
            self.load_error = str(error) if isinstance(error, VlchatError) else f"{type(error).__name__}: {error}"
            log.error("cannot load the model: %s", self.load_error)

    @property
    def ready(self) -> bool:
        return self.scheduler is not None

    def require_ready(self) -> Scheduler:
        if self.scheduler is None:
            raise ApiError(
                503,
                f"the model failed to load: {self.load_error}"
                if self.load_error
                else "the model is still loading; retry in a few seconds",
                code="model_loading",
            )
        return self.scheduler

    def check_model(self, name: str) -> None:
        if name != self.model_id:
            raise ApiError(
                404,
                f"the model {name!r} does not exist; this server serves {self.model_id!r}",
                "model",
                "model_not_found",
            )

    # --- requests -> jobs ----------------------------------------------------------------
    def generation(self, request, max_tokens: int | None) -> GenerationConfig:
        check_extra_fields(request.model_extra)
        fields = {
            "max_new_tokens": self.config.default_max_tokens if max_tokens is None else max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "seed": request.seed,
            "num_beams": request.num_beams,
            "top_k": getattr(request, "top_k", None),
            "min_new_tokens": getattr(request, "min_tokens", None),
            "repetition_penalty": getattr(request, "repetition_penalty", None),
            "frequency_penalty": request.frequency_penalty,
            "presence_penalty": request.presence_penalty,
            "logit_bias": logit_bias(request.logit_bias),
            "logprobs": request.logprobs,
            "top_logprobs": request.top_logprobs,
            "stop": stop_strings(getattr(request, "stop", None)),
        }
        try:
            config = GenerationConfig(**{k: v for k, v in fields.items() if v is not None})
            if self.chat is not None:
                check_for_model(config, self.chat.model.lm.vocab_size)
            return config
        except VlchatError as error:
            message = str(error)
            for ours, theirs in API_NAMES.items():
                message = message.replace(ours, theirs)
            raise ApiError(400, message, param=message.split()[0]) from None

    def prompt(self, messages: list[p.ChatMessage]) -> Prompt:
        """OpenAI messages -> vlchat messages (consecutive user messages merged) and their images."""
        prompt = Prompt([])
        for i, raw in enumerate(messages):
            role = api_role(raw.role, i)
            parts = self.parts(raw.content, prompt.images, f"messages[{i}].content")
            try:
                extra = message_fields(raw, role, i)  # tool calls and results (serve/tool_serving.py)
            except ToolRequestError as error:
                raise ApiError(400, str(error), error.param) from None
            if not parts and role != "system" and not extra.get("tool_calls") and role != "tool":
                raise ApiError(400, f"messages[{i}] has no content", f"messages[{i}].content")
            if prompt.messages and prompt.messages[-1].role == role == "user":
                prompt.messages[-1].parts.extend(parts)
            else:
                prompt.messages.append(Message(role, parts, **extra))
        return prompt

    def parts(self, content, images: dict, param: str) -> list:
        if content is None:
            return []
        if isinstance(content, str):
            return [Text(valid_text(self.fitting(content, param), param))]
        out = []
        for j, part in enumerate(content):
            if isinstance(part, p.TextPart):
                out.append(Text(valid_text(self.fitting(part.text, f"{param}[{j}].text"), f"{param}[{j}].text")))
                continue
            if self.chat is not None and self.chat.model.vision is None:  # else it would be dropped unseen
                raise ApiError(400, f"{self.model_id} is text-only: it cannot take images", f"{param}[{j}]")
            image = self.image(part.image_url.url, f"{param}[{j}].image_url")
            key = image_key(image)
            images[key] = image
            out.append(Image(key))
        return out

    def image(self, url: str, param: str):
        try:
            return resolve_image(url, self.config.image_policy, param=param)
        except ImageInputError as error:
            raise ApiError(error.status, str(error), param) from None
        except VlchatError as error:
            raise ApiError(400, str(error), param) from None

    # --- request cost, bounded before the model's thread sees it --------------------------
    def max_prompt_chars(self, max_new_tokens: int = 0) -> int | None:
        """No text longer than this can fit: the window's free tokens x the longest vocabulary
        piece in characters (a necessary bound, so nothing that fits is ever refused by it)."""
        if self.chat is None:
            return None
        lm = self.chat.model.lm
        return max(lm.context_window - max_new_tokens, 0) * lm.longest_token_chars

    def fitting(self, text: str, param: str) -> str:
        """Refuse one text that cannot fit the context window, by its length alone (no tokenizing)."""
        limit = self.max_prompt_chars()
        if limit is not None and len(text) > limit:
            message = too_long(f"{param} has {len(text):,} characters", self.chat.model.lm, limit)
            raise ApiError(400, message, param, "context_length_exceeded")
        return text

    def check_size(self, prompt: Prompt, generation: GenerationConfig) -> None:
        """The whole conversation's characters against the window left after max_tokens."""
        limit = self.max_prompt_chars(generation.max_new_tokens)
        total = sum(len(part.text) for m in prompt.messages for part in m.parts if isinstance(part, Text))
        if limit is not None and total > limit:
            message = f"the messages have {total:,} characters with max_tokens {generation.max_new_tokens}"
            raise ApiError(400, too_long(message, self.chat.model.lm, limit), "messages", "context_length_exceeded")

    def job(self, prompt: Prompt, template: str | None, generation: GenerationConfig, emit, tools: tuple = ()) -> Job:
        """Check and tokenize a prompt into a job. This runs in a request thread, not on the model's
        worker: a long prompt's tokenizing never holds up other requests' decoding."""
        try:
            chosen = get_template(template or self.model_template)
            chosen.segments(prompt.messages)  # refuses a bad role order now
        except VlchatError as error:
            raise ApiError(
                400, str(error), "template" if template and "template" in str(error) else "messages"
            ) from None
        if not prompt.messages or prompt.messages[-1].role not in ("user", "tool"):
            raise ApiError(
                400, "the last message must be a user message (the one to answer) or a tool result", "messages"
            )
        self.require_ready()
        self.check_size(prompt, generation)
        model = self.chat.model
        instructed = model.reads_instructions  # InstructBLIP: an image's key names its text too
        keys = encode(
            chosen, prompt.messages, model.lm.tokenize, model.tokens_per_image, tools=tools, instructed=instructed
        )[0]
        try:
            check_window(len(keys), generation.max_new_tokens, model.lm.context_window, len(tools))
        except ContextTooLong as error:
            raise ApiError(400, str(error), "messages", error.code) from None
        job = Job(prompt.messages, prompt.images, chosen, generation, emit, self.config.timeout_s, tools=tools)
        job.keys = keys
        return job

    def completion_job(self, request: p.ChatCompletionRequest, emit) -> Job:
        """Validate a chat-completions request (raises ApiError) and build its job."""
        self.require_ready()
        self.check_model(request.model)
        if request.n not in (None, 1):
            raise ApiError(400, f"n must be 1 (vlchat returns one choice per request), got {request.n}", "n")
        generation = self.generation(request, request.max_completion_tokens or request.max_tokens)
        try:
            tools = tool_request(request)
        except ToolRequestError as error:
            raise ApiError(400, str(error), error.param) from None
        offered = tuple(tools.tools) if tools is not None else ()  # rendered in the prompt, so tokenized with it
        job = self.job(self.prompt(request.messages), request.template, generation, emit, offered)
        if tools is not None:
            fmt = get_format(job.template.tool_format)
            try:
                job.structure = tools.structure(fmt, self.scheduler.lm.tokenizer)
            except ToolRequestError as error:
                raise ApiError(400, str(error), error.param) from None
            job.call_format, job.legacy_functions = (fmt if tools.calling else None), tools.legacy
        if job.structure is not None and generation.num_beams > 1:
            raise ApiError(
                400, "num_beams > 1 cannot be combined with tools or response_format; use num_beams 1", "num_beams"
            )
        return job

    def describe_logprobs(self, entries: list[TokenLogprob]) -> list[p.TokenLogprob]:
        """Token ids -> OpenAI's logprob objects (token text, its UTF-8 bytes, log-probability)."""
        lm = self.chat.model.lm

        def shown(token_id: int) -> tuple[str, list[int]]:
            if token_id not in self._token_text:
                raw = token_bytes(lm, token_id)
                self._token_text[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
            return self._token_text[token_id]

        def value(logprob: float) -> float:
            return max(logprob, -9999.0)  # OpenAI's floor for "practically impossible"; JSON has no -inf

        out = []
        for entry in entries:
            text, raw = shown(entry.token_id)
            top = [p.TopLogprob(token=shown(t)[0], logprob=value(v), bytes=shown(t)[1]) for t, v in entry.top]
            out.append(p.TokenLogprob(token=text, logprob=value(entry.logprob), bytes=raw, top_logprobs=top))
        return out

    # --- running jobs --------------------------------------------------------------------
    async def run(self, build: Callable[[Callable], Job], disconnected: Disconnected) -> Run:
        """Build and queue a job (in a thread: images may be fetched and decoded), wait until it starts."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = await asyncio.to_thread(build, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            self.require_ready().submit(job)
        except QueueFull as error:
            raise ApiError(429, f"{error}; retry later", code="queue_full") from None
        run = Run(job, events, disconnected)
        run.describe = self.describe_logprobs
        first = await run.next()
        if isinstance(first, Failed):
            raise ApiError(first.status, first.message, code=first.code)
        return run


class Run:
    """A queued job's events as an async stream. `close()` (always called by the consumer)
    cancels the job if it is still going and calls `on_end` once, e.g. to store the answer."""

    def __init__(self, job: Job, events: asyncio.Queue, disconnected: Disconnected) -> None:
        self.job, self.events, self.disconnected = job, events, disconnected
        self.text: list[str] = []
        self.logprobs: list[TokenLogprob] = []  # with logprobs: one per answer token
        self.finished: Finished | None = None
        self.done = False
        self.on_end: Callable[[Run], None] | None = None
        self.message: p.ResponseMessage | None = None  # the parsed answer (tool calls), once complete
        self.describe: Callable[[list[TokenLogprob]], list[p.TokenLogprob]] = lambda entries: []

    async def next(self):
        while True:
            try:
                event = await asyncio.wait_for(self.events.get(), timeout=0.5)
            except TimeoutError:
                if await self.disconnected():
                    raise ClientGone() from None
                continue
            if isinstance(event, Delta):
                self.text.append(event.text)
                self.logprobs += event.logprobs
            self.finished = event if isinstance(event, Finished) else None
            self.done = isinstance(event, (Finished, Failed))
            return event

    async def rest(self) -> AsyncIterator:
        while not self.done:
            yield await self.next()

    def close(self) -> None:
        if not self.done:
            self.job.cancelled.set()
            self.done = True
        if self.on_end is not None:
            end, self.on_end = self.on_end, None
            end(self)


class ClientGone(Exception):
    pass


def api_role(role: str, index: int) -> str:
    """An OpenAI message role as ours (`developer` is a system message, the legacy `function` a
    tool result); 400 for the others."""
    ours = {"developer": "system", "function": "tool"}.get(role, role)
    if ours not in ("system", "user", "assistant", "tool"):
        raise ApiError(
            400,
            f"messages[{index}].role {role!r} is not supported; use system, user, assistant or tool",
            f"messages[{index}].role",
        )
    return ours


def check_extra_fields(extra: dict | None) -> None:
    """Fields a request carries beyond the declared ones: harmless ones pass, others are a 400."""
    for name, value in (extra or {}).items():
        if name in HARMLESS_FIELDS:
            continue
        if name in FUNCTION_CALLING_FIELDS:  # declared on /v1/chat/completions, so extra only elsewhere
            raise ApiError(
                400,
                f"{name} is supported on /v1/chat/completions only; a conversation reply cannot take it yet",
                name,
                "unsupported_field",
            )
        if name == "modalities" and value in (["text"], None):
            continue
        if name in UNSUPPORTED_FIELDS:
            raise ApiError(
                400, f"{name} is not supported by vlchat: {UNSUPPORTED_FIELDS[name]}", name, "unsupported_field"
            )
        shown = name if len(name) <= 60 else name[:60] + "…"
        raise ApiError(
            400,
            f"unknown field {shown!r}: vlchat refuses fields it does not know rather than ignore a setting "
            "(see docs/api.md for the accepted fields)",
            shown,
            "unknown_field",
        )


def logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's {"token id": bias} (JSON keys are strings) -> {id: bias}."""
    if bias is None:
        return None
    out = {}
    for key, value in bias.items():
        if not key.strip().isdigit():
            shown = key if len(key) <= 40 else key[:40] + "…"
            raise ApiError(400, f'logit_bias keys must be token ids such as "42", got {shown!r}', "logit_bias")
        out[int(key)] = value
    return out


def too_long(what: str, lm, limit: int) -> str:
    return (
        f"{what}; at most {limit:,} fit in the context window of {lm.context_window} tokens "
        f"(at up to {lm.longest_token_chars} characters per token)"
    )


def stop_strings(stop) -> tuple[str, ...] | None:
    if stop is None:
        return None
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stops) > 4 or not all(stops):
        raise ApiError(400, "stop must be a non-empty string or a list of at most 4 non-empty strings", "stop")
    return tuple(valid_text(s, "stop") for s in stops)


def valid_text(text: str, param: str) -> str:
    """Refuse text that is not valid Unicode (JSON can carry lone surrogates such as "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"{param} is not valid Unicode text (it holds a lone surrogate)", param) from None
    return text


def usage(u) -> p.Usage:
    return p.Usage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        total_tokens=u.prompt_tokens + u.completion_tokens,
        prompt_tokens_details=p.PromptTokensDetails(cached_tokens=u.cached_tokens),
    )


async def drain(run) -> None:
    """Read a run (a `Run`, or the agent's) to its end: a failure is an ApiError, a client gone a
    499; the run is closed in every case."""
    try:
        async for event in run.rest():
            if isinstance(event, Failed):
                raise ApiError(event.status, event.message, code=event.code)
    except ClientGone:
        raise ApiError(499, "the client closed the connection") from None
    finally:
        run.close()


def failed_event(event: Failed) -> str:
    """A failure in the middle of a stream, as one SSE event with OpenAI's error body."""
    return f"data: {json.dumps(ApiError(event.status, event.message, code=event.code).body())}\n\n"


async def complete(run: Run, model_id: str) -> p.ChatCompletion:
    """Collect a run into one chat.completion object."""
    await drain(run)
    message, finish = response(
        "".join(run.text), run.finished.finish_reason, run.job.call_format, run.job.legacy_functions
    )
    run.message = message
    logprobs = p.ChoiceLogprobs(content=run.describe(run.logprobs)) if run.job.config.logprobs else None
    return p.ChatCompletion(
        model=model_id,
        choices=[p.Choice(message=message, finish_reason=finish, logprobs=logprobs)],
        usage=usage(run.finished.usage),
    )


async def sse(run: Run, model_id: str, include_usage: bool) -> AsyncIterator[str]:
    """A run as Server-Sent Events in OpenAI's chunk format, ending with `data: [DONE]`."""
    head = p.ChatCompletionChunk(id=p.completion_id(), created=p.now(), model=model_id, choices=[])

    def chunk(**fields) -> str:
        return f"data: {head.model_copy(update=fields).model_dump_json(exclude_none=True)}\n\n"

    yield chunk(choices=[p.ChunkChoice(delta=p.Delta(role="assistant", content=""))])
    calls = DeltaStream(run.job.call_format, run.job.legacy_functions) if run.job.call_format else None
    try:
        async for event in run.rest():
            if isinstance(event, Delta):
                logprobs = p.ChoiceLogprobs(content=run.describe(event.logprobs)) if run.job.config.logprobs else None
                for delta in calls.feed(event.text) if calls else [p.Delta(content=event.text)]:
                    yield chunk(choices=[p.ChunkChoice(delta=delta, logprobs=logprobs)])
                    logprobs = None  # a Delta's logprobs go with its first chunk
            elif isinstance(event, Finished):
                for delta in calls.finish() if calls else []:
                    yield chunk(choices=[p.ChunkChoice(delta=delta)])
                finish = calls.finish_reason(event.finish_reason) if calls else event.finish_reason
                yield chunk(choices=[p.ChunkChoice(delta=p.Delta(), finish_reason=finish)])
                if include_usage:
                    yield chunk(choices=[], usage=usage(event.usage))
            elif isinstance(event, Failed):
                yield failed_event(event)
        yield "data: [DONE]\n\n"
    except ClientGone:
        return
    finally:  # also when the client goes away and the server cancels this generator
        run.close()
