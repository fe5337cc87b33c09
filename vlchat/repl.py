"""The interactive terminal chat behind `vlchat chat` (streams the engine's iterator)."""

from __future__ import annotations

import sys

from vlchat.chat.engine import ChatSession, load_session
from vlchat.errors import VlchatError

HELP = """commands:
  /image PATH   add an image to your next message (any turn; several allowed)
  /result TEXT  answer the model's tool call(s) with TEXT (e.g. JSON), then let it go on
  /reset        start a new conversation
  /save FILE    save the conversation as JSON
  /load FILE    load a saved conversation
  /help         this text
  /exit         quit (also Ctrl-D)"""


def repl(session: ChatSession, images: list[str]) -> None:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print(f"vlchat — template {session.template.name}; {len(images)} image(s) attached. /help for commands.")
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
            if line.startswith("/"):
                session = command(session, line)
                if session is None:
                    return
                continue
            session.ask(line)
            stream_answer(session)
        except VlchatError as error:
            print(f"error: {error}", file=sys.stderr)


def command(session: ChatSession, line: str) -> ChatSession | None:
    """Run one /command; returns the session to go on with, or None to leave."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return None
    if name == "/help":
        print(HELP)
    elif name == "/reset":
        session.reset()
        print("(new conversation)")
    elif name == "/result":
        session.add_tool_result(arg)
        stream_answer(session)
    elif name in ("/image", "/save", "/load") and not arg:
        raise VlchatError(f"{name} needs a file path, e.g. {name} picture.jpg")
    elif name == "/image":
        session.upload_img(arg)
        print(f"(image added: {arg})")
    elif name == "/save":
        session.save(arg)
        print(f"(saved to {arg})")
    elif name == "/load":
        session = load_session(session.chat, arg)
        print(f"(loaded {len(session.messages)} messages from {arg})")
    else:
        raise VlchatError(f"unknown command {name}; /help lists them")
    return session


def stream_answer(session: ChatSession) -> None:
    """Print the answer as it streams; Ctrl-C stops the generation, not the program."""
    print("vlchat> ", end="", flush=True)
    try:
        for chunk in session.stream():
            if chunk.notice:
                print(f"[{chunk.notice}] ", end="", file=sys.stderr)
            print(chunk.text, end="", flush=True)
    except KeyboardInterrupt:
        print(" [stopped]", end="")
    print()
    for call in session.messages[-1].tool_calls if session.messages else ():
        print(f"[tool call {call.id}] {call.name}({call.arguments})  — answer with /result TEXT")
