"""Wiring for `vlchat serve`: the service, the store and the app, run by uvicorn.

uvicorn starts listening at once and the model loads in the background, so `/health` answers
503 ("loading") until it is ready, as vLLM and Ollama do while they load weights.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

from fastapi import FastAPI

from vlchat.assets import vlchat_home
from vlchat.errors import VlchatError
from vlchat.serve.api import create_app
from vlchat.serve.conversations import Conversations
from vlchat.serve.serving import ChatService, ServeConfig
from vlchat.serve.store import ConversationStore


def build_app(
    config: ServeConfig, load_chat: Callable[[], object], model_name: str, template: str = "chatml"
) -> FastAPI:
    home = config.home or vlchat_home()
    store = ConversationStore(home / "vlchat.db")
    service = ChatService(config, load_chat, model_name, template)
    return create_app(service, Conversations(service, store))


def check_address(host: str, port: int) -> None:
    """Fail with one line, before the model loads, if the address cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise VlchatError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


def serve(app: FastAPI, host: str, port: int) -> None:
    import uvicorn

    logging.getLogger("vlchat").setLevel(logging.INFO)
    shown = f"[{host}]" if ":" in host else host
    print(
        f"vlchat: web UI at http://{shown}:{port}/ , OpenAI-compatible API at http://{shown}:{port}/v1 "
        "(the model loads in the background; Ctrl-C stops)",
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
