"""HTTP routes (FastAPI): they only translate HTTP to the serving layer and back.

Every failure leaves as OpenAI's error object `{"error": {"message", "type", "param", "code"}}`
with its status: 400 bad request, 401 key, 404 unknown model/route/conversation, 413 too large,
415 a body that is not JSON, 422 schema, 429 queue full, 503 loading, 504 timeout; a bug is a
500 without a traceback. Schema errors name the field as a client wrote it (`messages[0].content[1]`)
and the value it sent.
"""

from __future__ import annotations

import hmac
import logging
import re
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from vlchat.serve import protocol as p
from vlchat.serve.agent_serving import AgentRun, agent_request, agent_response, run_agent
from vlchat.serve.conversations import Conversations
from vlchat.serve.serving import ApiError, ChatService, complete, sse
from vlchat.serve.webui import add_webui

log = logging.getLogger(__name__)
OPEN_PATHS = ("/health", "/openapi.json", "/docs", "/redoc")  # no API key needed
ERRORS = {code: {"model": p.ErrorResponse} for code in (400, 401, 404, 413, 415, 422, 429, 503)}
JSON_TYPES = re.compile(r"application/([\w.+-]+\+)?json")
LENIENT_TYPES = ("", "text/plain", "application/x-www-form-urlencoded")  # curl -d sends the last one
PART_EXAMPLES = '{"type": "text", "text": ...} or {"type": "image_url", "image_url": {"url": ...}}'
BRANCH_LABEL = re.compile(r"(str|int|float|bool|none|[\w-]+\[.*\])")  # pydantic's union member names in a loc


def create_app(service: ChatService, conversations: Conversations) -> FastAPI:
    app = FastAPI(
        title="vlchat",
        version="0.1.0",
        responses=ERRORS,
        description="OpenAI-compatible chat completions with images, plus stored conversations.",
    )
    app.state.service, app.state.conversations = service, conversations
    add_error_handlers(app)
    add_guards(app, service)
    add_openai_routes(app)
    add_conversation_routes(app)
    add_webui(app)
    return app


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def schema_error(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = error.errors()
        if errors and errors[0].get("type") == "json_invalid":
            return error_response(
                ApiError(400, f"the request body is not valid JSON: {errors[0]['msg']}", code="invalid_json")
            )
        where, message = describe_schema_error(errors)
        return error_response(ApiError(422, message, where or None, "invalid_schema"))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        response = error_response(ApiError(error.status_code, str(error.detail)))
        response.headers.update(error.headers or {})  # e.g. 405's Allow
        return response

    @app.exception_handler(UnicodeEncodeError)
    async def bad_text(request: Request, error: UnicodeEncodeError) -> JSONResponse:
        return error_response(
            ApiError(400, "the request holds text that is not valid Unicode (a lone surrogate)", code="invalid_text")
        )

    @app.exception_handler(Exception)
    async def bug(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(ApiError(500, "internal server error"))


def add_guards(app: FastAPI, service: ChatService) -> None:
    """Body size (413), API key (401) and body type (415) checks, before any route reads the body."""
    limit = int(service.config.max_body_mb * 2**20)
    key = service.config.api_key
    too_large = ApiError(
        413, f"the request body is larger than {service.config.max_body_mb:g} MB", code="request_too_large"
    )

    @app.middleware("http")
    async def guard(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return error_response(too_large)
        if key and request.url.path.startswith("/v1") and not authorized(request, key):
            return error_response(
                ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
            )
        if request.method not in ("POST", "PUT", "PATCH"):
            return await call_next(request)
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if length is None or not JSON_TYPES.fullmatch(media):
            body = await read_body(request, limit)
            if body is None:
                return error_response(too_large)
            request._body = body  # replayed to the route (Starlette caches the body here)
            if body.strip() and not JSON_TYPES.fullmatch(media):
                if media not in LENIENT_TYPES or body.lstrip()[:1] not in (b"{", b"["):
                    return error_response(
                        ApiError(
                            415,
                            f"send the request body as JSON with 'Content-Type: application/json' "
                            f"(got {media or 'no Content-Type'!r})",
                            code="unsupported_media_type",
                        )
                    )
                # a JSON body sent as form data or text (e.g. plain `curl -d`): read it as JSON
                headers = [(k, v) for k, v in request.scope["headers"] if k.lower() != b"content-type"]
                request.scope["headers"] = headers + [(b"content-type", b"application/json")]
        return await call_next(request)


async def read_body(request: Request, limit: int) -> bytes | None:
    """The whole body, or None once it passes `limit` bytes (a chunked body has no length to check first)."""
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            return None
    return bytes(body)


def describe_schema_error(errors: list[dict]) -> tuple[str, str]:
    """(param, message) for pydantic's errors: the most specific one (the deepest location, so a
    bad content part wins over "content is not a string"), said in the request's own terms."""
    if not errors:
        return "", "invalid request"
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    where, kind, ctx = param_path(first.get("loc", ())), first.get("type"), first.get("ctx") or {}
    if not where:
        return "", f"the request body must be a JSON object, got {shown(first.get('input'))}"
    if kind == "union_tag_invalid":
        return where, (
            f"{where} has type {shown(ctx.get('tag'))}, which vlchat does not accept; "
            f"use {ctx.get('expected_tags', 'another type')}"
        )
    if kind == "union_tag_not_found":
        return where, f"{where} has no {ctx.get('discriminator', 'type')}: write {PART_EXAMPLES}"
    if kind == "missing":
        return where, f"{where} is required"
    return where, f"{where}: {first.get('msg', 'invalid value')}, got {shown(first.get('input'))}"


def param_path(loc: tuple) -> str:
    """('body', 'messages', 0, 'content', 'list[tagged-union[...]]', 1, 'image_url', 'image_url', 'url')
    -> 'messages[0].content[1].image_url.url': no 'body', no union member names, no tag values."""
    out, skip_tag = "", False
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        if skip_tag:  # a tagged union's member name follows the list index
            skip_tag = False
            continue
        if BRANCH_LABEL.fullmatch(part):
            skip_tag = "tagged-union" in part
            continue
        out += f".{part}" if out else part
    return out


def shown(value) -> str:
    """A client's value, short: objects and lists by kind, long strings cut."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, str) and len(value) > 40:
        return repr(value[:40]) + f"… ({len(value):,} characters)"
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "…"


def authorized(request: Request, key: str) -> bool:
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def add_openai_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        """Readiness: 200 once the model is loaded, 503 while it loads (or if loading failed)."""
        service: ChatService = request.app.state.service
        status = "ok" if service.ready else ("error" if service.load_error else "loading")
        body = {"status": status, "model": service.model_id}
        if service.ready:
            scheduler = service.scheduler
            body["batch"] = {
                "max": scheduler.max_batch,
                "active": len(scheduler.active),
                "prefilling": len(scheduler.prefilling),
                "beam_searches": len(scheduler.searching),
                "peak": scheduler.peak_batch,
                "waiting": scheduler.waiting.qsize(),
            }
            body["prefix_cache"] = vars(service.scheduler.prefix_cache.stats())
        return JSONResponse(body, status_code=200 if service.ready else 503)

    @app.get("/v1/models", response_model=p.ModelList)
    async def models(request: Request) -> p.ModelList:
        return p.ModelList(data=[p.ModelCard(id=request.app.state.service.model_id)])

    @app.get("/v1/models/{model}", response_model=p.ModelCard)
    async def model(model: str, request: Request) -> p.ModelCard:
        request.app.state.service.check_model(model)
        return p.ModelCard(id=model)

    @app.post(
        "/v1/chat/completions", response_model=p.ChatCompletion, responses={200: {"content": {"text/event-stream": {}}}}
    )
    async def chat_completions(body: p.ChatCompletionRequest, request: Request):
        """OpenAI chat completions; `stream: true` answers with Server-Sent Events."""
        service: ChatService = request.app.state.service
        usage = bool(body.stream_options and body.stream_options.include_usage)
        build = lambda emit: service.completion_job(body, emit)  # noqa: E731
        if (agent := agent_request(body, service.config.agent_tools)) is not None:  # server-side tools
            run = await run_agent(service, agent, build, request.is_disconnected)
            return await agent_response(run, service.model_id, bool(body.stream), usage)
        run = await service.run(build, request.is_disconnected)
        if body.stream:
            return StreamingResponse(sse(run, service.model_id, usage), media_type="text/event-stream")
        return await complete(run, service.model_id)


def add_conversation_routes(app: FastAPI) -> None:
    @app.get("/v1/conversations")
    def list_conversations(
        request: Request, limit: int = Query(50, ge=0, le=1000), offset: int = Query(0, ge=0, le=2**63 - 1)
    ) -> dict:
        return request.app.state.conversations.list(limit, offset)

    @app.post("/v1/conversations")
    def create_conversation(body: p.ConversationCreate, request: Request) -> dict:
        return request.app.state.conversations.create(body)

    @app.get("/v1/conversations/{conversation_id}")
    def get_conversation(conversation_id: str, request: Request) -> dict:
        return request.app.state.conversations.get(conversation_id)

    @app.patch("/v1/conversations/{conversation_id}")
    def update_conversation(conversation_id: str, body: p.ConversationUpdate, request: Request) -> dict:
        return request.app.state.conversations.update(conversation_id, body)

    @app.delete("/v1/conversations/{conversation_id}")
    def delete_conversation(conversation_id: str, request: Request) -> dict:
        return request.app.state.conversations.delete(conversation_id)

    @app.post(
        "/v1/conversations/{conversation_id}/messages",
        response_model=p.ChatCompletion,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def reply(conversation_id: str, body: p.ConversationReply, request: Request):
        """Add a user message (or regenerate the last answer) and answer it; both are stored."""
        state = request.app.state
        run = await state.conversations.reply(conversation_id, body, request.is_disconnected)
        if isinstance(run, AgentRun):
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return await agent_response(run, state.service.model_id, bool(body.stream), usage)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(sse(run, state.service.model_id, usage), media_type="text/event-stream")
        return await complete(run, state.service.model_id)

    @app.get(
        "/v1/conversations/{conversation_id}/export",
        responses={200: {"content": {"text/markdown": {}, "application/json": {}}}},
    )
    def export(
        conversation_id: str, request: Request, format: str = Query("markdown", pattern="^(markdown|json)$")
    ) -> Response:
        """The conversation as a Markdown transcript or JSON, as a download."""
        text, media = request.app.state.conversations.export(conversation_id, format)
        name = f"{conversation_id}.{'json' if format == 'json' else 'md'}"
        return Response(text, media_type=media, headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @app.get("/v1/images/{key}", response_class=FileResponse)
    def image(key: str, request: Request) -> FileResponse:
        """A stored conversation image by content hash (PNG)."""
        path = request.app.state.conversations.store.image_path(key) if len(key) == 64 else None
        if path is None or not Path(path).is_file():
            raise ApiError(404, f"no stored image {key[:16]!r}", "key", "image_not_found")
        return FileResponse(path, media_type="image/png")
