"""The agent loop: the model answers or calls tools, the executor runs each call, the observation goes
back as a `tool` message, and so on until the model answers without a call or the step cap forces an
answer. Every step is streamed as `AgentEvent`s through one iterator, which the CLI (`vlchat agent`),
the API's server-side tools and the web UI all consume.

The idea follows lagent's Internlm2Agent (a bounded loop of model turn -> action -> environment turn,
ending on a turn without an action or at max_turn), written here for vlchat's engine: the calls are
the chat engine's function calling (chat/tools.py formats, a grammar under tool_choice "auto"), the
tools those of a `ToolRegistry`, run by the `ToolExecutor` (which never raises).

A run, step by step (step k = one generation):

    step 1        tool_choice = AgentConfig.tool_choice ("auto"; "required" or a tool name forces a call)
    steps 2..N    tool_choice "auto"
    answer        after N = max_steps steps that called tools, a user message with `final_instruction`
                  and tool_choice "none": the model must answer in words

The tools stay in the prompt at every step (also the forced one), so the rendered conversation only
ever grows at its end and the session's KV cache (or the server's prefix cache) is reused: each step
prefills only the new call results. An image a tool returns (zoom's crop) is added to the tool
message as an image part, so the model looks at it in the next step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL.Image import Image as PILImage

from vlchat.agent.executor import Observation, ToolExecutor
from vlchat.chat.generate import Chunk
from vlchat.chat.messages import Image, Message, Text, ToolCall
from vlchat.chat.templates import Template
from vlchat.chat.tools import CallStream, ContentDelta, ToolSpec, get_format
from vlchat.errors import VlchatError

FINAL_INSTRUCTION = "Now answer my question in words, using what the tools returned. Do not call any more tools."


@dataclass(frozen=True)
class AgentConfig:
    max_steps: int = 5  # steps that may call tools; after that many, an answer without tools is forced
    tool_choice: str = "auto"  # the first step's: "auto" | "required" | a tool name (later steps: "auto")
    final_instruction: str = FINAL_INSTRUCTION  # the user message that forces the answer at the cap

    def __post_init__(self) -> None:
        if not 1 <= self.max_steps <= 50:
            raise VlchatError(f"max steps must be between 1 and 50, got {self.max_steps}")
        if not isinstance(self.tool_choice, str) or not self.tool_choice:
            raise VlchatError("the first step's tool choice must be auto, required or a tool name")


# --- events --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepStarted:
    step: int
    tool_choice: str  # the step's: "auto" | "required" | a name | "none" (the forced answer)


@dataclass(frozen=True)
class TextDelta:
    step: int
    text: str  # what the model says in words (call markup is never in it)


@dataclass(frozen=True)
class Notice:
    step: int
    text: str  # e.g. the engine dropped old turns to fit the context window


@dataclass(frozen=True)
class CallStarted:
    step: int
    id: str
    name: str
    arguments: str  # JSON text as the model wrote it


@dataclass(frozen=True)
class Observed:
    step: int
    call_id: str
    observation: Observation


@dataclass(frozen=True)
class FinalAnswer:
    text: str  # every step's words, joined by a blank line (what the TextDeltas spelled)
    finish_reason: str  # the last step's: "stop" | "length" | "stopped"
    steps: int  # generations in this run
    forced: bool  # the step cap was reached and the answer was forced
    usage: dict[str, int] = field(default_factory=dict)  # summed over the steps


AgentEvent = StepStarted | TextDelta | Notice | CallStarted | Observed | FinalAnswer


class AgentSession(Protocol):
    """What the loop needs from a chat session: `ChatSession` (chat/engine.py) has it all, and the
    server wraps its scheduler in the same shape (serve/agent_serving.py)."""

    template: Template
    messages: list[Message]
    tools: tuple[ToolSpec, ...]
    tool_choice: str
    grammar_tools: tuple[ToolSpec, ...] | None  # the calls' grammar when narrower than `tools`
    last_finish_reason: str | None

    def upload_img(self, source: Any) -> str: ...

    def ask(self, text: str) -> None: ...

    def add_image(self, source: Any) -> Image: ...

    def stream(self) -> Iterator[Chunk]: ...


# --- the loop ------------------------------------------------------------------------------------


class Agent:
    """A chat session that may call the tools of `executor`. `ask()` adds a question (and images)
    and returns the run's events; the conversation (and its KV cache) carries over between asks."""

    def __init__(self, session: AgentSession, executor: ToolExecutor, config: AgentConfig | None = None) -> None:
        self.session, self.executor, self.config = session, executor, config or AgentConfig()
        check_tool_choice(self.config.tool_choice, executor.registry.names)
        session.tools = tuple(ToolSpec(t.name, t.description, t.parameters) for t in executor.registry)

    def ask(self, question: str, images: Sequence[PILImage] = ()) -> Iterator[AgentEvent]:
        """Add the user's images and question, then run the loop (see `run`)."""
        names = []
        for image in images:
            self.session.upload_img(image)
            names.append(self.executor.context.add_image(image))
        if names:  # the model names images in its calls: tell it the names
            question = f"{question}\n(images for tools: {', '.join(names)})"
        self.session.ask(question)
        return self.run()

    def run(self) -> Iterator[AgentEvent]:
        """Answer the pending user message: generate, run the calls, repeat; events as they happen."""
        said: list[str] = []
        usage = {"prompt_tokens": 0, "reused_tokens": 0, "completion_tokens": 0}
        step, calling_steps = 0, 0
        while True:
            step += 1
            forced = calling_steps >= self.config.max_steps
            choice = "none" if forced else (self.config.tool_choice if step == 1 else "auto")
            if forced:
                self.session.ask(self.config.final_instruction)
            yield StepStarted(step, choice)
            yield from self._generate(step, choice, said)
            add_usage(usage, getattr(self.session, "timings", None))
            answer = self.session.messages[-1]
            if answer.content:
                said.append(answer.content)
            if not answer.tool_calls or forced:
                self.session.tool_choice = "auto"
                finish = self.session.last_finish_reason or "stop"
                yield FinalAnswer("\n\n".join(said), finish, step, forced, usage)
                return
            calling_steps += 1
            for call in answer.tool_calls:
                yield CallStarted(step, call.id, call.name, call.arguments)
                observation = self.executor.run(call.name, call.arguments)
                self.session.messages.append(self.tool_message(call, observation))
                yield Observed(step, call.id, observation)

    def _generate(self, step: int, choice: str, said: list[str]) -> Iterator[AgentEvent]:
        """One generation: text deltas without the call markup (calls are read from the answer)."""
        self.session.tool_choice = choice
        self.session.grammar_tools = image_names_only(self.session.tools, list(self.executor.context.images))
        words = CallStream(get_format(self.session.template.tool_format)) if choice != "none" else None
        first = True
        for chunk in self.session.stream():
            if chunk.notice:
                yield Notice(step, chunk.notice)
            texts = (
                [chunk.text] if words is None else [e.text for e in words.feed(chunk.text) if type(e) is ContentDelta]
            )
            if chunk.finish_reason is not None and words is not None:
                texts += [e.text for e in words.finish() if type(e) is ContentDelta]
            for text in texts:
                text = text.lstrip() if first else text
                if not text:
                    continue
                if first and said:
                    yield TextDelta(step, "\n\n")
                first = False
                yield TextDelta(step, text)

    def tool_message(self, call: ToolCall, observation: Observation) -> Message:
        """The `tool` message of one call: the observation's text, then any image it made."""
        parts: list = [Text(observation.content)]
        parts += [self.session.add_image(made.image) for made in observation.images]
        return Message("tool", parts, tool_call_id=call.id, name=call.name)


def image_names_only(tools: Sequence[ToolSpec], names: list[str]) -> tuple[ToolSpec, ...]:
    """The tools with every string "image" argument limited to the conversation's image names, for the
    calls' grammar only (the prompt shows the tools as they are, so its prefix, and the KV cache, stay).
    A small model otherwise writes names that do not exist ("triangle" for "image_1")."""
    if not names:
        return tuple(tools)
    out = []
    for tool in tools:
        properties = tool.parameters.get("properties", {})
        image = properties.get("image")
        if isinstance(image, dict) and image.get("type") == "string":
            narrowed = {**properties, "image": {**image, "enum": names}}
            tool = ToolSpec(tool.name, tool.description, {**tool.parameters, "properties": narrowed})
        out.append(tool)
    return tuple(out)


def check_tool_choice(choice: str, names: Sequence[str]) -> None:
    if choice not in ("auto", "required") and choice not in names:
        known = ", ".join(names) or "none"
        raise VlchatError(f"the first step's tool choice must be auto, required or one of the tools ({known})")
    if choice == "required" and not names:
        raise VlchatError('tool choice "required" needs at least one tool')


def add_usage(usage: dict[str, int], timings: Any) -> None:
    if timings is None:
        return
    usage["prompt_tokens"] += timings.prompt_tokens
    usage["reused_tokens"] += timings.reused_tokens
    usage["completion_tokens"] += timings.completion_tokens


# --- records (the CLI's JSON lines, the API's vlchat_steps) -------------------------------------


def event_record(event: AgentEvent) -> dict[str, Any] | None:
    """A call or an observation as JSON-ready data; None for the other events."""
    if isinstance(event, CallStarted):
        return {
            "type": "tool_call",
            "step": event.step,
            "id": event.id,
            "name": event.name,
            "arguments": event.arguments,
        }
    if isinstance(event, Observed):
        return {"type": "observation", "step": event.step, "tool_call_id": event.call_id, **event.observation.to_dict()}
    return None


@dataclass
class AgentResult:
    answer: str
    finish_reason: str
    steps: list[dict[str, Any]]  # event_record of every call and observation, in order
    forced: bool
    usage: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "answer": self.answer,
            "steps": self.steps,
            "finish_reason": self.finish_reason,
            "forced_answer": self.forced,
            "usage": self.usage,
        }


def collect(events: Iterator[AgentEvent]) -> AgentResult:
    """Run the events to the end and keep the answer and the steps."""
    steps = []
    for event in events:
        if (record := event_record(event)) is not None:
            steps.append(record)
        if isinstance(event, FinalAnswer):
            return AgentResult(event.text, event.finish_reason, steps, event.forced, event.usage)
    raise VlchatError("the agent stopped before answering")
