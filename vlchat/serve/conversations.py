"""Stored conversations (`/v1/conversations`, a vlchat extension used by the web UI).

A reply appends the user's message once generation has started (the prompt fits and the model
accepted it) and the assistant's answer when it ends, each in its own transaction: a server
killed midway loses at most the answer being generated. An answer stopped by the client is
kept as far as it got, as ChatGPT and MiniGPT-4's demo keep a stopped answer.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from vlchat.chat.messages import Image, Message, Text, ToolCall
from vlchat.chat.template_lookup import get_template
from vlchat.chat.tools import new_call_id
from vlchat.errors import VlchatError
from vlchat.serve import protocol as p
from vlchat.serve.agent_serving import AgentRun, agent_request, run_agent
from vlchat.serve.scheduler import Job
from vlchat.serve.serving import ApiError, ChatService, Disconnected, Prompt, Run, api_role
from vlchat.serve.store import ConversationStore, NotFound


class Conversations:
    def __init__(self, service: ChatService, store: ConversationStore) -> None:
        self.service, self.store = service, store
        self.answering: set[str] = set()  # conversations with an answer in progress
        self.lock = threading.Lock()

    def _call(self, method: Callable, *args, **kwargs):
        try:
            return method(*args, **kwargs)
        except NotFound as error:
            raise ApiError(404, str(error), "conversation_id", "conversation_not_found") from None
        except VlchatError as error:
            raise ApiError(400, str(error)) from None

    def list(self, limit: int, offset: int) -> dict:
        return {"object": "list", "data": self._call(self.store.list, limit, offset)}

    def get(self, conversation_id: str) -> dict:
        return public(self._call(self.store.get, conversation_id))

    def stored(self, conversation_id: str) -> dict:
        """The conversation as stored (server-side only: image parts may hold file paths)."""
        return self._call(self.store.get, conversation_id)

    def delete(self, conversation_id: str) -> dict:
        if not self._call(self.store.delete, conversation_id):
            raise ApiError(404, f"no conversation {conversation_id!r}", "conversation_id", "conversation_not_found")
        return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}

    def update(self, conversation_id: str, body: p.ConversationUpdate) -> dict:
        system = {"system": body.system} if "system" in body.model_fields_set else {}
        return public(
            self._call(self.store.update, conversation_id, title=body.title, settings=body.settings, **system)
        )

    def export(self, conversation_id: str, form: str) -> tuple[str, str]:
        """(text, media type) of a conversation as Markdown or JSON."""
        conversation = self.get(conversation_id)
        if form == "json":
            return json.dumps(conversation, ensure_ascii=False, indent=2), "application/json"
        if form != "markdown":
            raise ApiError(400, f"format must be markdown or json, got {form!r}", "format")
        return to_markdown(conversation), "text/markdown; charset=utf-8"

    def create(self, body: p.ConversationCreate) -> dict:
        roles = [api_role(m.role, i) for i, m in enumerate(body.messages)]
        messages = [
            stored_message(role, m, self.stored_parts(m.content, f"messages[{i}].content"))
            for i, (role, m) in enumerate(zip(roles, body.messages))
        ]
        try:  # refuse now a history no reply could continue (e.g. starting with an answer)
            get_template(body.template or self.service.model_template).segments(
                self.prompt(body.system, messages).messages, add_generation_prompt=False
            )
        except VlchatError as error:
            raise ApiError(400, str(error), "messages") from None
        return public(
            self._call(self.store.create, body.title or "New chat", body.system, body.template, body.settings, messages)
        )

    def stored_parts(self, content, param: str) -> list[dict]:
        """OpenAI content -> stored parts; images are decoded, checked and saved by content hash."""
        images: dict = {}
        parts = self.service.parts(content, images, param)
        out = []
        for part in parts:
            if isinstance(part, Text):
                out.append({"type": "text", "text": part.text})
            else:  # the file's path stays in the images table, never in a message
                self._call(self.store.save_image, part.key, images[part.key])
                out.append({"type": "image", "key": part.key})
        return out

    # --- replies -------------------------------------------------------------------------
    def reply_job(self, conversation_id: str, body: p.ConversationReply, emit) -> tuple[Job, dict | None, int]:
        """(job, user message to store or None, messages to keep) for a reply; runs in a worker thread."""
        self.service.require_ready()
        conversation = self.stored(conversation_id)
        stored = conversation["messages"]
        if body.regenerate:
            while stored and stored[-1]["role"] == "assistant":
                stored = stored[:-1]
            new = None
        elif body.content is None or body.content == "" or body.content == []:
            raise ApiError(400, "content is required (or set regenerate: true)", "content")
        else:
            new = {"role": "user", "parts": self.stored_parts(body.content, "content")}
            stored = stored + [new]
        prompt = self.prompt(conversation.get("system"), stored)
        generation = self.service.generation(body, body.max_tokens)
        job = self.service.job(prompt, conversation.get("template"), generation, emit)
        return job, new, len(stored) - (1 if new else 0)  # keep: regenerate drops the old answer

    def prompt(self, system: str | None, stored: list[dict]) -> Prompt:
        """Stored messages -> a prompt. Consecutive user messages merge (an answer interrupted by
        a crash or stopped before any text leaves a user message unanswered)."""
        prompt = Prompt([Message("system", [Text(system)])] if system is not None else [])
        for message in stored:
            if restored := tool_messages(message, lambda part: self.image_part(part, prompt)):
                prompt.messages += restored
                continue
            parts = [
                Text(part["text"]) if part["type"] == "text" else self.image_part(part, prompt)
                for part in message["parts"]
            ]
            if prompt.messages and prompt.messages[-1].role == message["role"] == "user":
                prompt.messages[-1].parts.extend(parts)
            else:
                prompt.messages.append(Message(message["role"], parts))
        return prompt

    def image_part(self, part: dict, prompt: Prompt) -> Image:
        path = self.store.image_path(part["key"])
        if path is None:
            raise ApiError(400, f"image {part['key'][:12]}… of this conversation is missing from the store")
        prompt.images[part["key"]] = path  # read by the worker only if its embeddings are not cached
        return Image(part["key"], str(path))

    async def reply(self, conversation_id: str, body: p.ConversationReply, disconnected: Disconnected) -> Run:
        """Start a reply; the user message is stored now, the answer when the run ends.
        One reply per conversation at a time (409 otherwise), so stored turns never interleave."""
        with self.lock:
            if conversation_id in self.answering:
                raise ApiError(
                    409,
                    "an answer is already being generated in this conversation; wait for it or stop it",
                    "conversation_id",
                    "conversation_busy",
                )
            self.answering.add(conversation_id)
        pending: dict = {}

        def build(emit):
            job, pending["new"], pending["keep"] = self.reply_job(conversation_id, body, emit)
            return job

        try:
            agent = agent_request(body, self.service.config.agent_tools)
            if agent is None:
                run = await self.service.run(build, disconnected)
            else:  # server-side tools: the steps are stored with the answer (serve/agent_serving.py)
                run = await run_agent(self.service, agent, build, disconnected)
            if body.regenerate:
                self._call(self.store.truncate, conversation_id, pending["keep"])  # the old answer goes
            if pending["new"] is not None:
                self._call(self.store.append, conversation_id, [pending["new"]])
        except BaseException:
            self.answering.discard(conversation_id)
            raise
        run.on_end = lambda ended: self._store_answer(conversation_id, ended)
        return run

    def _store_answer(self, conversation_id: str, run: Run | AgentRun) -> None:
        try:
            if isinstance(run, AgentRun):
                if messages := run.stored_messages(self.store.save_image):
                    self.store.append(conversation_id, messages)
                return
            text = "".join(run.text).strip()
            if text or run.finished is not None:
                self.store.append(conversation_id, [{"role": "assistant", "parts": [{"type": "text", "text": text}]}])
        except NotFound:  # deleted while the answer was being generated
            pass
        finally:
            self.answering.discard(conversation_id)


def stored_message(role: str, message: p.ChatMessage, parts: list[dict]) -> dict:
    """An OpenAI message as stored: calls as "tool_call" parts, a tool result as a "user" message
    holding one "tool_result" part (serve/store.py)."""
    if role == "tool":
        text = " ".join(part["text"] for part in parts if part["type"] == "text")
        result = {"type": "tool_result", "tool_call_id": message.tool_call_id, "name": message.name, "content": text}
        return {"role": "user", "parts": [result]}
    calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls or []]
    if message.function_call is not None:
        calls.append({"id": None, "name": message.function_call.name, "arguments": message.function_call.arguments})
    return {"role": role, "parts": parts + [{"type": "tool_call", **call} for call in calls]}


def tool_messages(stored: dict, image_part: Callable[[dict], Image] | None = None) -> list[Message]:
    """Engine messages for a stored message with tool parts ([] when it has none). A result's images
    (zoom's crops, stored by the agent) become image parts through `image_part`."""
    parts = stored["parts"]
    if parts and all(part["type"] == "tool_result" for part in parts):
        return [
            Message(
                "tool",
                [Text(part["content"])] + [image_part(i) for i in part.get("images", []) if image_part],
                tool_call_id=part.get("tool_call_id"),
                name=part.get("name"),
            )
            for part in parts
        ]
    calls = [part for part in parts if part["type"] == "tool_call"]
    if not calls:
        return []
    texts = [Text(part["text"]) for part in parts if part["type"] == "text"]
    tool_calls = tuple(ToolCall(c.get("id") or new_call_id(), c["name"], c["arguments"]) for c in calls)
    return [Message(stored["role"], texts, tool_calls=tool_calls)]


def public(conversation: dict) -> dict:
    """A conversation as clients see it: image parts by key and URL (`/v1/images/<key>`), never by
    the server's file path (older stores kept the path in each message)."""
    messages = [
        {**message, "parts": [public_part(part) for part in message["parts"]]}
        for message in conversation.get("messages", [])
    ]
    return {**conversation, "messages": messages} if "messages" in conversation else conversation


def public_part(part: dict) -> dict:
    if part.get("type") != "image":
        return part
    return {"type": "image", "key": part["key"], "url": f"/v1/images/{part['key']}"}


def to_markdown(conversation: dict) -> str:
    """A readable transcript; images appear as links to the server's stored copy."""
    created = datetime.fromtimestamp(conversation["created"], UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# {conversation['title']}", "", f"*{created}*", ""]
    if conversation.get("system"):
        lines += [f"**System:** {conversation['system']}", ""]
    names = {"user": "User", "assistant": "Assistant", "system": "System"}
    for message in conversation["messages"]:
        parts = [markdown_part(part) for part in message["parts"]]
        lines += [f"**{names[message['role']]}:** " + "\n\n".join(parts), ""]
    return "\n".join(lines)


def markdown_part(part: dict) -> str:
    if part["type"] == "text":
        return part["text"]
    if part["type"] == "tool_call":
        return f"*calls* `{part['name']}({part['arguments']})`"
    if part["type"] == "tool_result":
        return f"*result of* `{part.get('name') or part.get('tool_call_id') or 'a tool'}`: {part['content']}"
    return f"![image](/v1/images/{part['key']})"
