"""The Python API: `vlchat.load(name_or_dir, device=..., dtype=...)` returns a `ChatModel` that speaks
the verbs of the projects vlchat follows, all on one engine (chat/engine.py):

- MiniGPT-4's `Chat`: `upload_img(image)`, `ask(text)`, `answer()` / `stream()`, `reset()`;
- InternLM's `stream_chat(query, history)`: yields (response so far, history + [(query, response)]);
- Ziya-Visual's `chat(query, previous_querys, previous_outputs)`: one answer with earlier turns given.
Generation options are GenerationConfig fields (max_new_tokens, temperature, top_p, ...) as keywords.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace

from vlchat.config import GenerationConfig
from vlchat.errors import VlchatError
from vlchat.model.loaders import model_config


def resolve_device(device: str) -> str:
    """ "auto" | "cpu" | "cuda" | "cuda:N" -> a torch device string that exists here (model/placement.py)."""
    from vlchat.model.placement import resolve_device as resolve

    return resolve(device)


def load(
    name_or_dir: str = "default",
    device: str = "cpu",
    dtype: str | None = None,
    load_in: str | None = None,
    device_map: str | None = None,
    trust_remote_code: bool = False,
) -> ChatModel:
    """Load a model (a preset, a model directory, a `vlchat models` name) onto `device` ("auto", "cpu",
    "cuda", "cuda:N"); `dtype` "auto" | "float32" | "bfloat16" | "float16" (GPUs) overrides the model's;
    `load_in` "8bit" | "4bit" (bitsandbytes, GPUs) and `device_map` "auto" (several GPUs) for large LMs;
    `trust_remote_code` runs a checkpoint's own modeling code (never by default)."""
    from vlchat.chat.engine import Chat
    from vlchat.model.placement import with_placement
    from vlchat.model.vlm import load_model

    config = with_placement(model_config(name_or_dir), device, dtype, load_in, device_map)
    if trust_remote_code:
        config = replace(config, lm=replace(config.lm, trust_remote_code=True))
    return ChatModel(Chat(load_model(config)))


class ChatModel:
    """One conversation at a time over a loaded model (call `reset()` or `new_session()` for another)."""

    def __init__(self, engine, system: str | None = None) -> None:
        self.engine = engine  # chat.engine.Chat: the model and its image-embedding cache
        self.system = system
        self.session = engine.session(system=system)

    @property
    def model(self):
        return self.engine.model

    def new_session(self, template: str | None = None, system: str | None = None):
        self.session = self.engine.session(template, system if system is not None else self.system)
        return self.session

    # --- MiniGPT-4 -------------------------------------------------------------------------
    def upload_img(self, image) -> str:
        """A path, bytes or PIL image, added to the coming question; returns its content key."""
        return self.session.upload_img(image)

    def ask(self, text: str) -> None:
        self.session.ask(text)

    def answer(self, **generation) -> str:
        return self.session.answer(_generation(generation))

    def stream(self, **generation) -> Iterator[str]:
        """The answer's text deltas as they are generated."""
        for chunk in self.session.stream(_generation(generation)):
            if chunk.text:
                yield chunk.text

    def reset(self) -> None:
        self.session.reset()

    # --- InternLM --------------------------------------------------------------------------
    def stream_chat(
        self, query: str, history: Sequence[tuple[str, str]] | None = None, image=None, **generation
    ) -> Iterator[tuple[str, list[tuple[str, str]]]]:
        """InternLM's `stream_chat`: yields (response so far, history + [(query, response so far)])."""
        history = list(history or [])
        session = self._replay(history)
        if image is not None:
            session.upload_img(image)
        session.ask(query)
        response = ""
        for chunk in session.stream(_generation(generation)):
            if chunk.text:
                response += chunk.text
                yield response, history + [(query, response)]
        final = session.messages[-1].content
        yield final, history + [(query, final)]

    # --- Ziya-Visual -----------------------------------------------------------------------
    def chat(
        self,
        query: str,
        previous_querys: Sequence[str] = (),
        previous_outputs: Sequence[str] = (),
        image=None,
        **generation,
    ) -> str:
        """Ziya's `chat`: the answer to `query` after the earlier (query, output) turns."""
        if len(previous_querys) != len(previous_outputs):
            raise VlchatError(
                f"previous_querys has {len(previous_querys)} turns but previous_outputs {len(previous_outputs)}"
            )
        session = self._replay(list(zip(previous_querys, previous_outputs)))
        if image is not None:
            session.upload_img(image)
        session.ask(query)
        return session.answer(_generation(generation))

    def _replay(self, turns: list[tuple[str, str]]):
        """A fresh session holding earlier turns as messages (answers as text)."""
        from vlchat.chat.messages import Message

        session = self.new_session(self.session.template.name)
        for query, output in turns:
            session.messages += [Message.text_message("user", query), Message.text_message("assistant", output)]
        return session


def _generation(options: dict) -> GenerationConfig | None:
    if not options:
        return None
    try:
        return GenerationConfig(**{k: tuple(v) if k == "stop" else v for k, v in options.items()})
    except TypeError as error:
        raise VlchatError(f"unknown generation option: {error}") from None
