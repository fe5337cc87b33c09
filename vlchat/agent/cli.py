"""`vlchat agent`: the agent loop in the terminal -- a REPL, one question, or a JSONL batch -- all
printing the loop's events (agent/loop.py) as they come: the words streamed, each call and its result
on a line of its own.

Built-in tools are chosen by name (`--tools read_text,zoom`; default all five). The python tool runs
code in its sandbox (docs/agent-tools.md says what is isolated); arxiv_search needs the network and
reports "offline" without it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from vlchat.agent.builtin import BUILTIN_TOOLS, default_registry
from vlchat.agent.executor import ToolExecutor
from vlchat.agent.loop import Agent, AgentConfig, AgentEvent, CallStarted, Notice, Observed, TextDelta, collect
from vlchat.agent.tools import ToolContext, ToolRegistry
from vlchat.errors import VlchatError
from vlchat.images import load_image

SHOWN_RESULT_CHARS = 400  # a result longer than this is cut on screen (the model reads all of it)
HELP = """commands:
  /image PATH   add an image to your next question (any turn; several allowed)
  /reset        start a new conversation
  /help         this text
  /exit         quit (also Ctrl-D)"""


def tool_names(spec: str) -> list[str]:
    """`--tools`: "all" or comma-separated built-in names, checked (VlchatError names the known ones)."""
    names = list(BUILTIN_TOOLS) if spec.strip() == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in BUILTIN_TOOLS]
    if unknown or not names:
        raise VlchatError(
            f"unknown tool {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"choose from: {', '.join(BUILTIN_TOOLS)} (or all)"
        )
    return list(dict.fromkeys(names))


def registry_of(names: list[str]) -> ToolRegistry:
    """The built-in tools named, in the order given (building them loads nothing)."""
    tools = {tool.name: tool for tool in default_registry()}
    return ToolRegistry([tools[name] for name in names])


@dataclass
class AgentSetup:
    """What every `vlchat agent` mode needs to make an agent for a new conversation."""

    open_chat: Callable[[], object]
    tools: list[str]
    config: AgentConfig
    template: str | None
    system: str | None
    generation: object

    def __post_init__(self) -> None:
        from vlchat.agent.loop import check_tool_choice

        check_tool_choice(self.config.tool_choice, self.tools)
        self._chat = None

    def agent(self) -> Agent:
        if self._chat is None:
            self._chat = self.open_chat()
        session = self._chat.session(self.template, self.system, self.generation)
        return Agent(session, ToolExecutor(registry_of(self.tools), ToolContext()), self.config)


# --- printing events -------------------------------------------------------------------------------


def show(events: Iterator[AgentEvent]) -> None:
    """Print the words as they stream and each call and result on a line of its own (notices on stderr)."""
    out, midline = sys.stdout, False
    for event in events:
        if isinstance(event, TextDelta):
            print(event.text, end="", flush=True, file=out)
            midline = not event.text.endswith("\n")
            continue
        line = event_line(event)
        if line is not None:
            print(
                ("\n" if midline else "") + line, flush=True, file=out if not isinstance(event, Notice) else sys.stderr
            )
            midline = False
    if midline:
        print(file=out)


def event_line(event: AgentEvent) -> str | None:
    if isinstance(event, CallStarted):
        return f"[call {event.step}] {event.name} {event.arguments}"
    if isinstance(event, Observed):
        obs = event.observation
        content = obs.content if len(obs.content) <= SHOWN_RESULT_CHARS else obs.content[:SHOWN_RESULT_CHARS] + " …"
        images = "".join(f" [+image {i.name}]" for i in obs.images)
        status = "ok" if obs.ok else "error"
        return f"[{status} {obs.elapsed_s:.2f} s] {content}{images}"
    if isinstance(event, Notice):
        return f"[{event.text}]"
    return None


# --- the three modes -------------------------------------------------------------------------------


def answer_one(setup: AgentSetup, question: str | None, images: list[Path], as_json: bool) -> None:
    if question is None or not question.strip():
        raise VlchatError('empty question: give it as an argument, e.g. vlchat agent -i cat.jpg "What is this?"')
    loaded = [load_image(path) for path in images]  # refuse bad files before the slow load
    events = setup.agent().ask(question, loaded)
    if as_json:
        print(json.dumps(collect(events).to_dict(), ensure_ascii=False))
    else:
        show(events)


def answer_batch(setup: AgentSetup, path: Path) -> None:
    """One JSON line per input line (the `vlchat ask --batch` format), each with its answer and steps."""
    from vlchat.ask import batch_item, line_id, print_batch

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise VlchatError(f"cannot read batch file {path}: {error}") from None

    def answer(line: str) -> dict:
        question, images = batch_item(line, path.parent)
        loaded = [load_image(image) for image in images]
        return {**line_id(line), **collect(setup.agent().ask(question, loaded)).to_dict()}

    print_batch(lines, answer)


def repl(setup: AgentSetup, images: list[Path]) -> None:
    """Ask, see each call and its result, ask again; the conversation and its KV cache carry over."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    pending = [load_image(path) for path in images]
    agent = setup.agent()
    print(f"vlchat agent — tools: {', '.join(setup.tools)}; {len(pending)} image(s) attached. /help for commands.")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            continue
        if not line:
            continue
        try:
            name, _, arg = line.partition(" ")
            if name in ("/exit", "/quit"):
                return
            if name == "/help":
                print(HELP)
            elif name == "/reset":
                agent, pending = setup.agent(), []
                print("(new conversation)")
            elif name == "/image":
                if not arg.strip():
                    raise VlchatError("/image needs a file path, e.g. /image picture.jpg")
                pending.append(load_image(arg.strip()))
                print(f"(image added: {arg.strip()})")
            elif name.startswith("/"):
                raise VlchatError(f"unknown command {name}; /help lists them")
            else:
                print("vlchat> ", end="", flush=True)
                events, pending = agent.ask(line, pending), []
                try:
                    show(events)
                except KeyboardInterrupt:
                    print(" [stopped]")
        except VlchatError as error:
            print(f"error: {error}", file=sys.stderr)
