"""SQLite store for server-side conversations (the `/v1/conversations` endpoints and the web UI).

One file, three tables (conversations, messages, images); message parts use the engine's
session-file JSON: `[{"type": "text", "text": ...}, {"type": "image", "key": sha256}]` (stores written
before the API hid server paths also hold a "path" in image parts; the images table maps key -> file).
Function calling adds two part types: an assistant's `{"type": "tool_call", "id", "name",
"arguments"}` and a tool result `{"type": "tool_result", "tool_call_id", "name", "content"}`,
stored as a message of role "user" whose parts are all results (the role column is unchanged);
a result of the server's own tools may list the images it made: `"images": [{"key", "path"}]`.
Every method returns plain JSON-serialisable dicts/lists; every write is one transaction.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image as PILImage

from vlchat.errors import VlchatError

SCHEMA_VERSION = 1
DEFAULT_TITLE = "New chat"
MAX_TITLE = 200
AUTO_TITLE_CHARS = 40
ROLES = ("system", "user", "assistant")
_KEY = re.compile(r"[0-9a-f]{64}")  # sha256 hex: also keeps image file names inside images/
_UNSET: Any = object()  # lets update(system=None) clear the system prompt

_SCHEMA = (
    """CREATE TABLE conversations (
        id TEXT PRIMARY KEY, title TEXT NOT NULL, system TEXT, template TEXT,
        settings TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL)""",
    """CREATE TABLE messages (
        conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        position INTEGER NOT NULL, role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
        parts TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (conversation_id, position))""",
    "CREATE TABLE images (key TEXT PRIMARY KEY, path TEXT NOT NULL, created REAL NOT NULL)",
    "CREATE INDEX conversations_updated ON conversations (updated)",
)
_SUMMARY = """SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id)
              AS message_count FROM conversations c"""


class NotFound(VlchatError):
    """No conversation with that id (the API turns it into a 404)."""


def _check_parts(parts: Any) -> None:
    if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
        raise VlchatError("message parts must be a list of objects like {'type': 'text', 'text': '...'}")
    for part in parts:
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            continue
        if _tool_part(part):
            continue
        if (
            part.get("type") == "image"
            and _KEY.fullmatch(str(part.get("key")))
            and isinstance(part.get("path"), (str, type(None)))
        ):
            continue
        raise VlchatError(
            f"bad message part {json.dumps(part, default=str)[:80]}: expected {{'type': 'text', "
            "'text': str} or {'type': 'image', 'key': sha256 hex, 'path': str|null}"
        )


def _tool_part(part: dict) -> bool:
    """A stored tool call or tool result (strings; ids and names may be null)."""
    texts = {"tool_call": (("name", "arguments"), ("id",)), "tool_result": (("content",), ("tool_call_id", "name"))}
    required, optional = texts.get(part.get("type"), ((None,), ()))
    return all(isinstance(part.get(k), str) for k in required) and all(
        isinstance(part.get(k), (str, type(None))) for k in optional
    )


def _check_messages(messages: Any) -> list[tuple[str, str]]:
    """Validate first, write after: returns (role, parts JSON) pairs ready to insert."""
    if not isinstance(messages, list):
        raise VlchatError("messages must be a list of {'role': ..., 'parts': [...]} objects")
    checked = []
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise VlchatError(f"bad message role {role!r}: expected one of {', '.join(ROLES)}")
        _check_parts(message.get("parts"))
        checked.append((role, json.dumps(message["parts"], ensure_ascii=False)))
    return checked


def _check_title(title: Any) -> str:
    if not isinstance(title, str) or len(title) > MAX_TITLE:
        raise VlchatError(f"title must be a string of at most {MAX_TITLE} characters")
    return title


def _check_optional_text(name: str, value: Any) -> Any:
    if value is not None and not isinstance(value, str):
        raise VlchatError(f"{name} must be a string or null")
    return value


def _settings_json(settings: Any) -> str:
    if not isinstance(settings, dict):
        raise VlchatError("settings must be a JSON object")
    try:
        return json.dumps(settings, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise VlchatError(f"settings must be JSON-serialisable: {e}") from None


def _auto_title(checked: list[tuple[str, str]]) -> str | None:
    """First user text, collapsed onto one line and cut to ~40 characters; None if there is none."""
    for role, parts in checked:
        texts = [p["text"] for p in json.loads(parts) if p["type"] == "text"]
        line = " ".join(" ".join(texts).split())
        if role == "user" and line:
            return line if len(line) <= AUTO_TITLE_CHARS else line[:AUTO_TITLE_CHARS].rstrip() + "…"
    return None


class ConversationStore:
    """Thread-safe conversation store over one SQLite file; images live in `path.parent / "images"`."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.images_dir = self.path.parent / "images"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by the server's threads; the lock serialises every use of it.
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        try:
            self._configure()
        except (sqlite3.DatabaseError, VlchatError) as e:
            self._conn.close()
            raise VlchatError(f"cannot open conversation store {self.path}: {e}") from None

    def _configure(self) -> None:
        conn = self._conn
        # WAL: a SIGKILL mid-write leaves a WAL tail that recovery ignores, so committed transactions
        # survive and the file never corrupts. synchronous=FULL also fsyncs the WAL on each commit,
        # so commits survive power loss too; at human chat rates that one fsync per write is cheap.
        conn.execute("PRAGMA busy_timeout=10000")  # another process (a second server) may hold the lock
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise VlchatError(
                f"its schema version {version} is newer than this vlchat supports "
                f"({SCHEMA_VERSION}): upgrade vlchat or use another file"
            )
        if version == 0:
            with self._write() as c:
                # Re-read under the write lock: another process may have created the schema meanwhile.
                if c.execute("PRAGMA user_version").fetchone()[0] == 0:
                    for statement in _SCHEMA:
                        c.execute(statement)
                    c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction under the lock; BEGIN IMMEDIATE so reads inside it see what they write over."""
        with self._lock, self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            yield self._conn

    def _require(self, conn: sqlite3.Connection, conversation_id: str) -> sqlite3.Row:
        row = conn.execute("SELECT * FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        if row is None:
            raise NotFound(f"no conversation with id {conversation_id!r}")
        return row

    def _insert(self, conn: sqlite3.Connection, conversation_id: str, messages: Any, now: float) -> None:
        """Append validated messages at the next positions and auto-title from the first user text."""
        checked = _check_messages(messages)
        row = self._require(conn, conversation_id)
        start = conn.execute(
            "SELECT COALESCE(MAX(position) + 1, 0) FROM messages WHERE conversation_id = ?", (conversation_id,)
        ).fetchone()[0]
        rows = [(conversation_id, start + i, role, parts, now) for i, (role, parts) in enumerate(checked)]
        conn.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?)", rows)
        title = _auto_title(checked) if row["title"] == DEFAULT_TITLE else None
        conn.execute(
            "UPDATE conversations SET updated = ?, title = COALESCE(?, title) WHERE id = ?",
            (now, title, conversation_id),
        )

    def get(self, conversation_id: str) -> dict:
        """The conversation with its `messages` ({"role", "parts", "created"}) in order; NotFound if unknown."""
        with self._lock:
            row = self._require(self._conn, conversation_id)
            rows = self._conn.execute(
                "SELECT role, parts, created FROM messages WHERE conversation_id = ? ORDER BY position",
                (conversation_id,),
            ).fetchall()
        result = dict(row) | {"settings": json.loads(row["settings"])}
        result["messages"] = [
            {"role": r["role"], "parts": json.loads(r["parts"]), "created": r["created"]} for r in rows
        ]
        return result

    def create(
        self,
        title: str = DEFAULT_TITLE,
        system: str | None = None,
        template: str | None = None,
        settings: dict | None = None,
        messages: list[dict] | None = None,
    ) -> dict:
        conversation_id, now = f"conv_{uuid.uuid4().hex}", time.time()
        row = (
            conversation_id,
            _check_title(title),
            _check_optional_text("system", system),
            _check_optional_text("template", template),
            _settings_json(settings or {}),
            now,
            now,
        )
        with self._write() as conn:
            conn.execute("INSERT INTO conversations VALUES (?, ?, ?, ?, ?, ?, ?)", row)
            self._insert(conn, conversation_id, messages or [], now)
        return self.get(conversation_id)

    def list(self, limit: int = 50, offset: int = 0) -> list[dict]:
        """Newest-updated first, without messages but with `message_count`."""
        if not (isinstance(limit, int) and isinstance(offset, int) and 0 <= limit <= 1000 and offset >= 0):
            raise VlchatError("limit must be 0..1000 and offset >= 0")
        with self._lock:
            rows = self._conn.execute(
                f"{_SUMMARY} ORDER BY c.updated DESC, c.rowid DESC LIMIT ? OFFSET ?", (limit, offset)
            ).fetchall()
        return [dict(r) | {"settings": json.loads(r["settings"])} for r in rows]

    def append(self, conversation_id: str, messages: list[dict]) -> dict:
        with self._write() as conn:
            self._insert(conn, conversation_id, messages, time.time())
        return self.get(conversation_id)

    def truncate(self, conversation_id: str, keep: int) -> int:
        """Delete messages at position >= keep (regenerate the last answer); returns how many went."""
        if not isinstance(keep, int) or keep < 0:
            raise VlchatError(f"keep must be a non-negative integer, got {keep!r}")
        with self._write() as conn:
            self._require(conn, conversation_id)
            deleted = conn.execute(
                "DELETE FROM messages WHERE conversation_id = ? AND position >= ?", (conversation_id, keep)
            ).rowcount
            conn.execute("UPDATE conversations SET updated = ? WHERE id = ?", (time.time(), conversation_id))
        return deleted

    def update(
        self,
        conversation_id: str,
        *,
        title: str | None = None,
        system: str | None = _UNSET,
        template: str | None = _UNSET,
        settings: dict | None = None,
    ) -> dict:
        """Change the given fields; `system=None` / `template=None` clear them, omitted ones stay."""
        changes: dict[str, Any] = {"updated": time.time()}
        if title is not None:
            changes["title"] = _check_title(title)
        if system is not _UNSET:
            changes["system"] = _check_optional_text("system", system)
        if template is not _UNSET:
            changes["template"] = _check_optional_text("template", template)
        if settings is not None:
            changes["settings"] = _settings_json(settings)
        assignments = ", ".join(f"{column} = ?" for column in changes)  # column names are ours, not input
        with self._write() as conn:
            self._require(conn, conversation_id)
            conn.execute(f"UPDATE conversations SET {assignments} WHERE id = ?", (*changes.values(), conversation_id))
        return self.get(conversation_id)

    def delete(self, conversation_id: str) -> bool:
        """Remove a conversation and (by ON DELETE CASCADE) its messages; False if it did not exist."""
        with self._write() as conn:
            return conn.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,)).rowcount > 0

    def save_image(self, key: str, image: PILImage.Image) -> str:
        """Write `images/<key>.png` once, atomically (tmp + fsync + rename), record it; return its path."""
        if not _KEY.fullmatch(str(key)):
            raise VlchatError(f"bad image key {key!r}: expected a sha256 hex digest")
        final = self.images_dir / f"{key}.png"
        if not final.exists():  # content-addressed: an existing file already holds these pixels
            self.images_dir.mkdir(parents=True, exist_ok=True)
            _write_png(final, image)
        with self._write() as conn:
            conn.execute("INSERT OR IGNORE INTO images VALUES (?, ?, ?)", (key, str(final), time.time()))
        return str(final)

    def image_path(self, key: str) -> Path | None:
        """The saved file for `key`, or None if it was never saved (or its file has gone)."""
        with self._lock:
            row = self._conn.execute("SELECT path FROM images WHERE key = ?", (key,)).fetchone()
        return Path(row["path"]) if row and Path(row["path"]).exists() else None

    def integrity(self) -> str:
        """`PRAGMA integrity_check`: "ok" for a sound file, else the problems found."""
        with self._lock:
            return "; ".join(r[0] for r in self._conn.execute("PRAGMA integrity_check").fetchall())

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> ConversationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_png(final: Path, image: PILImage.Image) -> None:
    """Tmp file in the same directory, fsync, rename: readers see no file or the whole PNG, never part."""
    fd, tmp = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=".tmp", dir=final.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(final.parent, os.O_RDONLY)  # fsync the directory so the rename itself is durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
