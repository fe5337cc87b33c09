"""The chat engine: MiniGPT-4's Chat semantics (upload_img, ask, answer) with a kept KV cache.

A session keeps the KV cache of everything it has prefilled, keyed by what each position holds
(a token id, or (image hash, slot)). Each turn the whole conversation is rendered again by the
template, segment by segment; the longest prefix that matches the cache is reused and only the
rest is prefilled, so a follow-up question costs only its new tokens. Image embeddings are
cached by content hash. When history + max_new_tokens would overflow the context window, the
oldest whole turns are dropped (never the system prompt, never part of an image).

The CLI (`vlchat chat`, `vlchat ask`) answers through a session and `generate()`; the server
does not use sessions: its scheduler prefills and batch-decodes requests itself, with the same
prompt code (vlchat/chat/prompt.py), the same image-embedding cache (`Chat.image_embeddings`)
and the same `SequenceDecoder` (vlchat/chat/generate.py).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from vlchat.chat.beam import beam_search
from vlchat.chat.generate import Chunk, generate
from vlchat.chat.messages import Image, Message, Text
from vlchat.chat.prompt import (
    PositionKey,
    encode,
    first_slots,
    has_images,
    image_instructions,
    image_of,
    instructed_key,
    slot_ids,
)
from vlchat.chat.template_lookup import get_template
from vlchat.chat.templates import Template
from vlchat.chat.tools import ToolSpec, answer_message, get_format
from vlchat.config import GenerationConfig
from vlchat.errors import VlchatError
from vlchat.images import image_key, load_image
from vlchat.model.language import LMState
from vlchat.model.vlm import VisionLanguageModel

SESSION_FORMAT = 1


class Chat:
    """The model plus an LRU cache of image embeddings by content hash; makes sessions."""

    def __init__(self, model: VisionLanguageModel, max_cached_images: int = 64) -> None:
        self.model = model
        self.images: OrderedDict[str, torch.Tensor] = OrderedDict()  # key -> (N, D)
        self.max_cached_images = max_cached_images

    def session(
        self, template: str | None = None, system: str | None = None, generation: GenerationConfig | None = None
    ) -> ChatSession:
        return ChatSession(
            self, get_template(template or self.model.config.template), system, generation or GenerationConfig()
        )

    @torch.inference_mode()
    def image_embeddings(self, image, key: str | None = None, instruction: str = "") -> tuple[str, torch.Tensor]:
        """A loaded RGB image -> (content key, (N, D) embeddings), encoded once per content (and, for a
        model that reads instructions, per instruction text: `prompt.image_instructions`).

        A caller that knows the key already passes it (hashing a large image costs); it may then
        give a path instead of the image, read only if the embeddings are not cached."""
        key = key or image_key(image)
        instructed = self.model.reads_instructions
        stored = instructed_key(key, instruction) if instructed else key
        if stored not in self.images:
            image = image if hasattr(image, "mode") else load_image(image)
            texts = [instruction] if instructed else None
            self.images[stored] = self.model.encode_images(self.model.pixels(image)[None], texts)[0]
            if len(self.images) > self.max_cached_images:
                self.images.popitem(last=False)
        self.images.move_to_end(stored)
        return key, self.images[stored]


@dataclass
class Timings:
    image_encode_ms: float = 0.0
    prompt_tokens: int = 0
    reused_tokens: int = 0
    ttft_s: float = 0.0
    completion_tokens: int = 0
    decode_tok_s: float = 0.0
    total_s: float = 0.0


@dataclass
class ChatSession:
    chat: Chat
    template: Template
    system: str | None = None  # None: the template's default; "" : none
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    messages: list[Message] = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)
    last_finish_reason: str | None = None
    _state: LMState | None = None
    _cached: list[PositionKey] = field(default_factory=list)
    _pending_encode_ms: float = 0.0
    _images: dict[str, torch.Tensor] = field(default_factory=dict)  # this session's embeddings
    # A model that reads instructions encodes an image once its message's text is known (at the
    # prefill); until then the image waits here, by content key.
    _sources: dict[str, object] = field(default_factory=dict)
    # Function calling and structured output (chat/tools.py, chat/grammar.py): the tools offered,
    # "auto" | "required" | "none" | a function name, and a JSON Schema every answer must follow.
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: str = "auto"
    json_schema: dict | None = None
    # The calls' grammar when it is narrower than the tools shown in the prompt (the agent limits an
    # "image" argument to the conversation's image names); None: the tools' own schemas.
    grammar_tools: tuple[ToolSpec, ...] | None = None

    # --- MiniGPT-4's verbs -----------------------------------------------------------------
    def upload_img(self, source) -> str:
        """Add an image (path, bytes or PIL image) to the coming user message; returns its key."""
        part = self.add_image(source)
        self._pending_user().parts.append(part)
        return part.key

    def add_image(self, source) -> Image:
        """Encode an image (path, bytes or PIL image) for this session's prompts and return its part,
        for the caller to put in a message (upload_img: the coming user message; the agent: a tool result)."""
        image = source if hasattr(source, "mode") else load_image(source)
        path = str(Path(source).resolve()) if isinstance(source, (str, Path)) else None
        if self.chat.model.reads_instructions:
            key = image_key(image)
            self._sources[key] = image
            return Image(key, path)
        start = time.perf_counter()
        key, embeds = self.chat.image_embeddings(image)
        self._images[key] = embeds
        self._pending_encode_ms += (time.perf_counter() - start) * 1000
        return Image(key, path)

    def ask(self, text: str) -> None:
        if not text or not text.strip():
            raise VlchatError("empty question: type something to ask")
        self._pending_user().parts.append(Text(text.strip()))

    def answer(self, generation: GenerationConfig | None = None) -> str:
        """Generate the whole answer; returns it as stored (stripped, as MiniGPT-4 does)."""
        for _ in self.stream(generation):
            pass
        return self.messages[-1].content

    def add_tool_result(self, text: str) -> None:
        """Answer the last assistant message's tool calls (all of them with one text, in order)."""
        last = self.messages[-1] if self.messages else None
        if last is None or last.role != "assistant" or not last.tool_calls:
            raise VlchatError("no tool call to answer: the last answer called no tool")
        for call in last.tool_calls:
            self.messages.append(Message("tool", [Text(text)], tool_call_id=call.id, name=call.name))

    def reset(self) -> None:
        """Forget the conversation (the image-embedding cache stays)."""
        self.messages, self._state, self._cached = [], None, []

    # --- streaming -------------------------------------------------------------------------
    def stream(self, generation: GenerationConfig | None = None) -> Iterator[Chunk]:
        """Answer the pending user message, yielding text deltas, then a finish chunk."""
        config = generation or self.generation
        if not self.messages or self.messages[-1].role not in ("user", "tool"):
            raise VlchatError("nothing to answer: ask a question (or upload an image) first")
        keys, dropped = self._fit_context(config.max_new_tokens)
        if dropped:
            yield Chunk(notice=f"dropped the {dropped} oldest turn(s) to fit the context window")
        constraint = self._constraint()
        if constraint is not None and config.num_beams > 1:
            raise VlchatError("num_beams > 1 cannot be combined with tools or a JSON output format; use num_beams 1")
        start = time.perf_counter()
        logits, state = self._prefill(keys)
        first, shown, done = None, [], False
        try:
            for chunk in self._decode(logits, state, config, constraint):
                first = first or (time.perf_counter() if chunk.text else None)
                shown.append(chunk.text)
                if chunk.result is not None:
                    self._finish(chunk.result, keys, start, first)
                    done = True
                yield chunk
        finally:  # a consumer that stops early (Ctrl-C, a "stop" button) keeps the partial answer
            if not done:
                self.messages.append(Message.text_message("assistant", "".join(shown).strip()))
                self.last_finish_reason = "stopped"

    def _constraint(self):
        """The grammar for this session's tools / JSON schema (None when nothing is constrained)."""
        from vlchat.chat.structure import session_structure

        structure = session_structure(self)
        return structure.constraint(self.chat.model.lm) if structure is not None else None

    @property
    def calling(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def _decode(self, logits: torch.Tensor, state: LMState, config: GenerationConfig, constraint) -> Iterator[Chunk]:
        """The answer's chunks: greedy or sampled (generate.py), or beam search (beam.py) for num_beams > 1."""
        lm, stops = self.chat.model.lm, self.template.stop
        if config.num_beams > 1:
            return beam_search(lm, logits, state, config, stops + tuple(config.stop))
        return generate(lm, logits, state, config, stops, constraint)

    def _finish(self, result, keys: list[PositionKey], start: float, first: float | None) -> None:
        text = result.text.strip()
        exact = result.exact and text == result.text
        message = answer_message(text, get_format(self.template.tool_format) if self.calling else None)
        if exact and not message.tool_calls:  # an answer with calls is rendered again (content + calls)
            message.token_ids = tuple(result.token_ids)
        self.messages.append(message)
        self._state, self._cached = result.state, keys + result.fed_ids
        self.last_finish_reason = result.finish_reason
        end = time.perf_counter()
        first = first or end
        tokens = len(result.token_ids) or len(self.chat.model.lm.tokenize(result.text))
        self.timings = replace(
            self.timings,
            image_encode_ms=self._pending_encode_ms,
            ttft_s=first - start,
            completion_tokens=tokens,
            total_s=end - start,
            decode_tok_s=(tokens - 1) / (end - first) if tokens > 1 and end > first else 0.0,
        )
        self._pending_encode_ms = 0.0

    # --- prompt -> positions -> prefill ------------------------------------------------------
    def _pending_user(self) -> Message:
        if not self.messages or self.messages[-1].role != "user":
            self.messages.append(Message("user"))
        return self.messages[-1]

    def conversation(self) -> list[Message]:
        """The messages as rendered: the system prompt (if set) first."""
        head = [Message.text_message("system", self.system)] if self.system is not None else []
        return head + self.messages

    def position_keys(self, messages: list[Message]) -> list[PositionKey]:
        """Render and tokenize segment by segment (a stable prefix as the conversation grows)."""
        model = self.chat.model
        instructed = model.reads_instructions
        return encode(
            self.template, messages, model.lm.tokenize, model.tokens_per_image, tools=self.tools, instructed=instructed
        )[0]

    def _fit_context(self, max_new_tokens: int) -> tuple[list[PositionKey], int]:
        """Position keys of the conversation, dropping the oldest whole turns until it fits."""
        window, dropped = self.chat.model.lm.context_window, 0
        while True:
            keys = self.position_keys(self.conversation())
            if len(keys) + max_new_tokens <= window:
                return keys, dropped
            # the oldest turn: its user message, the answer, and any tool calls and results between
            turn_end = next((i for i in range(1, len(self.messages)) if self.messages[i].role == "user"), None)
            if turn_end is None:
                raise VlchatError(
                    f"the conversation is too long: {len(keys)} prompt tokens + max_new_tokens "
                    f"{max_new_tokens} > context window {window}; shorten the message or max_new_tokens"
                )
            del self.messages[:turn_end]
            dropped += 1

    def embed_keys(self, keys: list[PositionKey]) -> torch.Tensor:
        """Position keys -> (1, T, D) input embeddings (this session's images at their slots)."""
        images = [self._embeddings(key) for key in first_slots(keys)]
        return self.chat.model.embed(torch.tensor([slot_ids(keys)]), torch.stack(images) if images else None)

    def _embeddings(self, key: str) -> torch.Tensor:
        """(N, D) embeddings of the image at position key `key`; an instructed key (the model reads
        instructions) is encoded here the first time, with the text of the message that holds it."""
        if key not in self._images:
            start, image = time.perf_counter(), image_of(key)
            instruction = image_instructions(self.template, self.conversation())[image]
            self._images[key] = self.chat.image_embeddings(self._sources[image], image, instruction)[1]
            self._pending_encode_ms += (time.perf_counter() - start) * 1000
        return self._images[key]

    def _prefill(self, keys: list[PositionKey]) -> tuple[torch.Tensor, LMState]:
        """Reuse the cached prefix, prefill the rest; returns last logits (1, V) and the state.
        The LoRA adapter is on when the conversation has an image or offers tools: a cache computed
        with the other setting (the first image arrives, tools are switched on) is not reused."""
        adapter = self.chat.model.lm.adapter_on(has_images(keys), bool(self.tools))
        same_gate = self._state is not None and self._state.adapter == adapter
        state = self._state if same_gate else LMState(adapter=adapter)
        common = reusable_prefix(self._cached, keys) if same_gate else 0
        state.trim(common)
        embeds = self.embed_keys(keys[common:])  # (1, T, D)
        self.timings = Timings(prompt_tokens=len(keys), reused_tokens=common)
        self._state, self._cached = None, []  # until the answer completes
        return self.chat.model.lm.prefill(embeds, state)

    # --- persistence -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": SESSION_FORMAT,
            "template": self.template.name,
            "system": self.system,
            "generation": asdict(self.generation),
            "messages": [message_to_dict(m) for m in self.messages],
        }

    def save(self, path: str | Path) -> None:
        """Write the session as JSON (images by path and content hash), atomically."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=2))
            tmp.replace(path)
        except OSError as error:
            if tmp.parent.is_dir():
                tmp.unlink(missing_ok=True)
            raise VlchatError(f"cannot save the session to {path}: {error.strerror or error}") from None


def reusable_prefix(cached: list[PositionKey], keys: list[PositionKey]) -> int:
    """Length of the common prefix, kept below len(keys) (we need logits) and off image middles."""
    n = 0
    for a, b in zip(cached, keys):
        if a != b:
            break
        n += 1
    n = min(n, len(keys) - 1)
    while n > 0 and isinstance(keys[n], tuple) and keys[n][1] > 0:
        n -= 1
    return n


def message_to_dict(message: Message) -> dict:
    parts = [
        {"type": "text", "text": p.text} if isinstance(p, Text) else {"type": "image", "key": p.key, "path": p.source}
        for p in message.parts
    ]
    return {"role": message.role, "parts": parts, "token_ids": message.token_ids}


def load_session(chat: Chat, path: str | Path) -> ChatSession:
    """Read a saved session; each image is re-read from its path and must match its hash."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise VlchatError(f"cannot read session file {path}: {error}") from None
    if not isinstance(data, dict) or data.get("format") != SESSION_FORMAT:
        raise VlchatError(f"{path} is not a vlchat session file (format {SESSION_FORMAT})")
    try:
        return _session_from_dict(chat, data)
    except (KeyError, TypeError, AttributeError) as error:
        raise VlchatError(f"{path} is not a valid vlchat session file: bad or missing field {error}") from None


def _session_from_dict(chat: Chat, data: dict) -> ChatSession:
    generation = {k: tuple(v) if k == "stop" else v for k, v in data.get("generation", {}).items()}
    session = chat.session(data["template"], data.get("system"), GenerationConfig(**generation))
    for raw in data["messages"]:
        parts = [Text(p["text"]) if p["type"] == "text" else _restore_image(session, p) for p in raw["parts"]]
        ids = raw.get("token_ids")
        session.messages.append(Message(raw["role"], parts, tuple(ids) if ids is not None else None))
    session.template.segments(session.conversation())  # refuses a bad role order now, not later
    return session


def _restore_image(session: ChatSession, part: dict) -> Image:
    key, path = part["key"], part.get("path")
    if session.chat.model.reads_instructions:  # encoded at the next prefill, with its message's text
        if not path:
            raise VlchatError(f"image {key[:12]}… has no path; cannot restore it")
        image = load_image(path)
        if image_key(image) != key:
            raise VlchatError(f"image {path} changed since the session was saved (its hash differs)")
        session._sources[key] = image
        return Image(key, path)
    if key in session.chat.images:
        session._images[key] = session.chat.images[key]
    elif not path:
        raise VlchatError(f"image {key[:12]}… has no path and is not cached; cannot restore it")
    else:
        found, session._images[key] = session.chat.image_embeddings(load_image(path))
        if found != key:
            raise VlchatError(f"image {path} changed since the session was saved (its hash differs)")
    return Image(key, path)
