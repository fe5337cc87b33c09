"""Server-side tools (a vlchat extension): `"vlchat_tools": ["read_text", "zoom", ...]` on
/v1/chat/completions (and on a stored conversation's reply) runs the agent loop (agent/loop.py) on the
server. The answer is the final text; the calls and their results come in `vlchat_steps` (a whole
response) or one `vlchat_step` per chunk with empty `choices` (a stream). Client-defined `tools` keep
OpenAI's behaviour; a request may not give both (400).

Each step of the loop is one scheduler job, so steps share the decode batch with other requests and
reuse the prefix cache: step k+1 prefills only step k's call and results. The loop runs in a thread of
its own (tools may take seconds) and hands its events to the asyncio side through a queue.

Fields: `vlchat_tools` (names among the server's `--agent-tools`), `vlchat_tool_choice` (the first
step's: "auto", "required" or a tool name; later steps are "auto"), `vlchat_max_steps` (1..50).
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from vlchat.agent.builtin import default_registry
from vlchat.agent.executor import ToolExecutor
from vlchat.agent.loop import (
    Agent,
    AgentConfig,
    CallStarted,
    FinalAnswer,
    Observed,
    StepStarted,
    TextDelta,
    event_record,
)
from vlchat.agent.tools import ToolContext, ToolRegistry
from vlchat.chat.generate import Chunk
from vlchat.chat.messages import Image, Message, Text
from vlchat.chat.structure import PARALLEL_CALLS, build_structure
from vlchat.chat.tools import ToolError, answer_message, get_format
from vlchat.errors import VlchatError
from vlchat.serve import protocol as p
from vlchat.serve.scheduler import Delta, Failed, Finished, Job, QueueFull, Started
from vlchat.serve.serving import ApiError, ChatService, ClientGone, Disconnected, drain, failed_event

SERVER_TOOLS = ("read_text", "image_labels", "zoom")  # the default --agent-tools: no code, no network


@dataclass(frozen=True)
class AgentRequest:
    tools: tuple[str, ...]
    config: AgentConfig


def agent_request(request, server_tools: tuple[str, ...]) -> AgentRequest | None:
    """The request's vlchat_* fields, checked (ApiError 400); None when it asks for no server tools."""
    names = getattr(request, "vlchat_tools", None)
    choice = getattr(request, "vlchat_tool_choice", None)
    steps = getattr(request, "vlchat_max_steps", None)
    if names is None:
        for field_name, value in (("vlchat_tool_choice", choice), ("vlchat_max_steps", steps)):
            if value is not None:
                raise ApiError(400, f"{field_name} needs vlchat_tools", field_name)
        return None
    if getattr(request, "tools", None) is not None or getattr(request, "functions", None) is not None:
        raise ApiError(
            400, "give vlchat_tools (tools run by the server) or tools/functions (run by you), not both", "vlchat_tools"
        )
    if getattr(request, "response_format", None) is not None:
        raise ApiError(400, "response_format cannot be combined with vlchat_tools", "response_format")
    if (getattr(request, "num_beams", None) or 1) > 1:
        raise ApiError(400, "num_beams > 1 cannot be combined with vlchat_tools; use num_beams 1", "num_beams")
    unknown = [name for name in names if name not in server_tools]
    if unknown or not names:
        raise ApiError(
            400,
            f"vlchat_tools: unknown or disabled tool {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"this server offers: {', '.join(server_tools) or 'none'}",
            "vlchat_tools",
        )
    try:
        config = AgentConfig(max_steps=5 if steps is None else steps, tool_choice=choice or "auto")
        if config.tool_choice not in ("auto", "required") and config.tool_choice not in names:
            raise VlchatError(f"vlchat_tool_choice must be auto, required or one of vlchat_tools ({', '.join(names)})")
    except VlchatError as error:
        raise ApiError(400, str(error), "vlchat_max_steps" if "steps" in str(error) else "vlchat_tool_choice") from None
    return AgentRequest(tuple(dict.fromkeys(names)), config)


def server_registry(service: ChatService) -> ToolRegistry:
    """The server's tools, built once (their models load on first use and are then shared)."""
    if getattr(service, "agent_registry", None) is None:
        allowed = service.config.agent_tools
        service.agent_registry = ToolRegistry([t for t in default_registry() if t.name in allowed])
    return service.agent_registry


# --- one step = one scheduler job ----------------------------------------------------------------


class StepFailed(Exception):
    def __init__(self, failed: Failed) -> None:
        super().__init__(failed.message)
        self.failed = failed


class Cancelled(Exception):
    pass


@dataclass
class StepTimings:  # what the loop sums into FinalAnswer.usage
    prompt_tokens: int = 0
    reused_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class SchedulerSession:
    """agent/loop.py's AgentSession over the server's scheduler (one job per `stream()`)."""

    service: ChatService
    template: object
    messages: list[Message]
    images: dict
    generation: object
    deadline: float
    cancelled: threading.Event
    on_started: Callable[[], None]
    tools: tuple = ()
    tool_choice: str = "auto"
    grammar_tools: tuple | None = None
    last_finish_reason: str | None = None
    timings: StepTimings = field(default_factory=StepTimings)

    def upload_img(self, source) -> str:  # the server's images arrive inside the messages
        raise NotImplementedError

    def ask(self, text: str) -> None:
        if self.messages[-1].role == "user":
            self.messages[-1].parts.append(Text(text))
        else:
            self.messages.append(Message.text_message("user", text))

    def add_image(self, source) -> Image:
        from vlchat.images import image_key

        key = image_key(source)
        self.images[key] = source
        return Image(key)

    def stream(self) -> Iterator[Chunk]:
        scheduler = self.service.require_ready()
        fmt = get_format(self.template.tool_format)
        calling = bool(self.tools) and self.tool_choice != "none"
        grammar = self.grammar_tools if self.grammar_tools is not None else self.tools
        structure = None
        if calling:
            structure = build_structure(grammar, self.tool_choice, PARALLEL_CALLS, None, fmt, scheduler.lm.tokenizer)
        events: queue.Queue = queue.Queue()
        job = Job(list(self.messages), dict(self.images), self.template, self.generation, events.put)
        job.timeout_s = max(self.deadline - time.monotonic(), 0.001)
        job.cancelled, job.tools, job.structure = self.cancelled, tuple(self.tools), structure
        try:
            scheduler.submit(job)
        except QueueFull as error:
            raise StepFailed(Failed(f"{error}; retry later", 429, "queue_full")) from None
        text = []
        while True:
            try:
                event = events.get(timeout=0.5)
            except queue.Empty:
                if self.cancelled.is_set():
                    raise Cancelled() from None
                continue
            if isinstance(event, Started):
                self.on_started()
            elif isinstance(event, Delta):
                text.append(event.text)
                yield Chunk(event.text)
            elif isinstance(event, Failed):
                raise StepFailed(event)
            elif isinstance(event, Finished):
                self.messages.append(answer_message("".join(text).strip(), fmt if calling else None))
                self.last_finish_reason = event.finish_reason
                u = event.usage
                self.timings = StepTimings(u.prompt_tokens, u.cached_tokens, u.completion_tokens)
                yield Chunk(finish_reason=event.finish_reason)
                return


# --- a run: the loop in a thread, its events on the asyncio loop -----------------------------------


class AgentRun:
    """The loop's events as an async stream (like serving.Run). `close()` cancels what is still going
    and calls `on_end` once (stored conversations keep the steps and the answer there)."""

    def __init__(self, session: SchedulerSession, agent: Agent, disconnected: Disconnected) -> None:
        self.session, self.agent, self.disconnected = session, agent, disconnected
        self.prompt_length = len(session.messages)
        self.events: asyncio.Queue = asyncio.Queue()
        self.steps: list[dict] = []
        self.final: FinalAnswer | None = None
        self.step_text: list[str] = []  # the words of the step being generated
        self.done = False
        self.on_end: Callable[[AgentRun], None] | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()

        def put(item) -> None:
            loop.call_soon_threadsafe(self.events.put_nowait, item)

        def work() -> None:
            try:
                for event in self.agent.run():
                    put(event)
            except StepFailed as error:
                put(error.failed)
            except Cancelled:
                put(None)
            except ToolError as error:  # a grammar that does not compile (checked before the first step)
                put(Failed(str(error), 400, "invalid_tools"))
            except Exception as error:  # a bug: this request fails, the server goes on
                put(Failed(f"internal error in the agent loop: {type(error).__name__}"))

        self.session.on_started = lambda: put("started")
        threading.Thread(target=work, name="vlchat-agent", daemon=True).start()

    async def next(self):
        """The next event for the client (scheduler "started" markers and StepStarted are skipped)."""
        while True:
            try:
                event = await asyncio.wait_for(self.events.get(), timeout=0.5)
            except TimeoutError:
                if await self.disconnected():
                    self.session.cancelled.set()
                    raise ClientGone() from None
                continue
            if event == "started" or isinstance(event, StepStarted):
                self.step_text = []
                continue
            if (record := event_record(event)) is not None:
                self.steps.append(record)
            if isinstance(event, TextDelta):
                self.step_text.append(event.text)
            self.final = event if isinstance(event, FinalAnswer) else self.final
            self.done = event is None or isinstance(event, (FinalAnswer, Failed))
            return event

    async def first_step(self) -> None:
        """Wait until the first step's job has started; its refusal (a prompt too long) is an ApiError."""
        while True:
            event = await self.events.get()
            if event == "started":
                return
            if isinstance(event, Failed) or event is None:
                self.done = True
                failed = event or Failed("the request was cancelled", 499)
                raise ApiError(failed.status, failed.message, code=failed.code)

    async def rest(self) -> AsyncIterator:
        while not self.done:
            yield await self.next()

    def close(self) -> None:
        if not self.done:
            self.session.cancelled.set()
            self.done = True
        if self.on_end is not None:
            end, self.on_end = self.on_end, None
            end(self)

    def stored_messages(self, save_image: Callable) -> list[dict]:
        """The run's new messages as the conversation store keeps them: each calling step's answer with
        its tool_call parts, its results as one user message of tool_result parts (images saved), the
        final answer. The forced-answer instruction is not stored (it is the loop's, not the user's)."""
        out: list[dict] = []
        for message in self.session.messages[self.prompt_length :]:
            if message.role == "tool":
                result = {"type": "tool_result", "tool_call_id": message.tool_call_id, "name": message.name}
                result["content"] = " ".join(p.text for p in message.parts if isinstance(p, Text))
                result["images"] = [
                    {"key": i.key, "path": save_image(i.key, self.session.images[i.key])} for i in message.images
                ]
                if out and out[-1]["role"] == "user" and out[-1]["parts"][0]["type"] == "tool_result":
                    out[-1]["parts"].append(result)
                else:
                    out.append({"role": "user", "parts": [result]})
            elif message.role == "assistant":
                calls = [
                    {"type": "tool_call", "id": c.id, "name": c.name, "arguments": c.arguments}
                    for c in message.tool_calls
                ]
                text = [{"type": "text", "text": message.content}] if message.content or not calls else []
                out.append({"role": "assistant", "parts": text + calls})
        if self.final is None:  # stopped: keep what the current step said; drop calls left unanswered
            if out and out[-1]["role"] == "assistant":
                out[-1]["parts"] = [part for part in out[-1]["parts"] if part["type"] != "tool_call"]
            partial = "".join(self.step_text).strip()
            if partial and not (out and out[-1]["role"] == "assistant"):
                out.append({"role": "assistant", "parts": [{"type": "text", "text": partial}]})
            out = [m for m in out if m["parts"]]
        return out


async def run_agent(
    service: ChatService, request: AgentRequest, build: Callable, disconnected: Disconnected
) -> AgentRun:
    """Validate and build the conversation (a Job that is never queued: its messages, images, template,
    settings), start the loop, wait until its first step starts (a prompt that does not fit is a 400)."""
    job: Job = await asyncio.to_thread(build, lambda event: None)
    messages = list(job.messages)
    context = ToolContext()
    images = [service_image(job.images[i.key]) for m in messages for i in m.images]
    names = [context.add_image(image) for image in images]
    if names and messages[-1].role == "user":  # tools name images: tell the model the names
        last = messages[-1]
        messages[-1] = Message("user", [*last.parts, Text(f"(images for tools: {', '.join(names)})")])
    session = SchedulerSession(
        service,
        job.template,
        messages,
        dict(job.images),
        job.config,
        time.monotonic() + job.timeout_s,
        threading.Event(),
        lambda: None,
    )
    registry = server_registry(service)
    chosen = ToolRegistry([registry.get(name) for name in request.tools])
    run = AgentRun(session, Agent(session, ToolExecutor(chosen, context), request.config), disconnected)
    run.start()
    await run.first_step()
    return run


def service_image(image):
    """A request's image (PIL) or a stored conversation's (a path), as PIL for the tools."""
    from vlchat.images import load_image

    return image if hasattr(image, "mode") else load_image(image)


# --- responses -------------------------------------------------------------------------------------


def total_usage(final: FinalAnswer) -> p.Usage:
    u = final.usage
    return p.Usage(
        prompt_tokens=u["prompt_tokens"],
        completion_tokens=u["completion_tokens"],
        total_tokens=u["prompt_tokens"] + u["completion_tokens"],
        prompt_tokens_details=p.PromptTokensDetails(cached_tokens=u["reused_tokens"]),
    )


async def agent_complete(run: AgentRun, model_id: str) -> dict:
    """The run as one chat.completion object plus `vlchat_steps`."""
    await drain(run)
    if run.final is None:
        raise ApiError(499, "the answer was stopped")
    completion = p.ChatCompletion(
        model=model_id,
        choices=[p.Choice(message=p.ResponseMessage(content=run.final.text), finish_reason=run.final.finish_reason)],
        usage=total_usage(run.final),
    )
    return {**completion.model_dump(), "vlchat_steps": run.steps}


async def agent_sse(run: AgentRun, model_id: str, include_usage: bool) -> AsyncIterator[str]:
    """The run as OpenAI chunks: the words as content deltas; each call and result as a chunk with
    empty `choices` and a `vlchat_step` (the same record as in `vlchat_steps`)."""
    head = p.ChatCompletionChunk(id=p.completion_id(), created=p.now(), model=model_id, choices=[])

    def chunk(step: dict | None = None, **fields) -> str:
        body = head.model_copy(update=fields).model_dump(exclude_none=True)
        return f"data: {json.dumps({**body, **({'vlchat_step': step} if step else {})}, ensure_ascii=False)}\n\n"

    yield chunk(choices=[p.ChunkChoice(delta=p.Delta(role="assistant", content=""))])
    try:
        async for event in run.rest():
            if isinstance(event, TextDelta):
                yield chunk(choices=[p.ChunkChoice(delta=p.Delta(content=event.text))])
            elif isinstance(event, (CallStarted, Observed)):
                yield chunk(event_record(event), choices=[])
            elif isinstance(event, FinalAnswer):
                yield chunk(choices=[p.ChunkChoice(delta=p.Delta(), finish_reason=event.finish_reason)])
                if include_usage:
                    yield chunk(choices=[], usage=total_usage(event))
            elif isinstance(event, Failed):
                yield failed_event(event)
        yield "data: [DONE]\n\n"
    except ClientGone:
        return
    finally:
        run.close()


async def agent_response(run: AgentRun, model_id: str, stream: bool, include_usage: bool):
    """The HTTP response for a run: SSE when streaming, else one JSON object."""
    from fastapi.responses import JSONResponse, StreamingResponse

    if stream:
        return StreamingResponse(agent_sse(run, model_id, include_usage), media_type="text/event-stream")
    return JSONResponse(await agent_complete(run, model_id))
