"""Tests for vlchat.serve.store: a real SQLite file in tmp_path, threads, and a SIGKILLed writer."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from vlchat.assets import vlchat_home
from vlchat.errors import VlchatError
from vlchat.serve.store import DEFAULT_TITLE, ConversationStore, NotFound

REPO = Path(__file__).resolve().parents[2]
KEY = hashlib.sha256(b"red square").hexdigest()


def user(text: str) -> dict:
    return {"role": "user", "parts": [{"type": "text", "text": text}]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "parts": [{"type": "text", "text": text}]}


def texts(conversation: dict) -> list[str]:
    return [m["parts"][0]["text"] for m in conversation["messages"]]


@pytest.fixture
def store(tmp_path):
    s = ConversationStore(tmp_path / "chat.db")
    yield s
    s.close()


def test_vlchat_home_env_and_default(tmp_path, monkeypatch):
    monkeypatch.setenv("VLCHAT_HOME", str(tmp_path / "home"))
    assert vlchat_home() == tmp_path / "home" and (tmp_path / "home").is_dir()
    monkeypatch.delenv("VLCHAT_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert vlchat_home() == tmp_path / "user" / ".vlchat" and vlchat_home().is_dir()


def test_round_trip(store):
    parts = [{"type": "image", "key": KEY, "path": None}, {"type": "text", "text": "what is this?"}]
    created = store.create(
        title="Shapes",
        system="Be brief.",
        template="chatml",
        settings={"temperature": 0.2},
        messages=[{"role": "user", "parts": parts}, assistant("A red square.")],
    )
    assert created["id"].startswith("conv_") and len(created["id"]) == 5 + 32
    got = store.get(created["id"])
    assert got == created
    assert (got["title"], got["system"], got["template"], got["settings"]) == (
        "Shapes",
        "Be brief.",
        "chatml",
        {"temperature": 0.2},
    )
    assert [m["role"] for m in got["messages"]] == ["user", "assistant"]
    assert got["messages"][0]["parts"] == parts
    assert isinstance(got["messages"][0]["created"], float)


def test_list_newest_updated_first_with_counts(store):
    a = store.create(title="a")
    b = store.create(title="b", messages=[user("hi")])
    c = store.create(title="c")
    assert [x["id"] for x in store.list()] == [c["id"], b["id"], a["id"]]
    store.append(a["id"], [user("bump"), assistant("ok")])
    listed = store.list()
    assert [x["id"] for x in listed] == [a["id"], c["id"], b["id"]]
    assert [x["message_count"] for x in listed] == [2, 0, 1]
    assert all("messages" not in x for x in listed)
    assert [x["id"] for x in store.list(limit=1, offset=1)] == [c["id"]]
    with pytest.raises(VlchatError, match="limit"):
        store.list(limit=-1)


def test_append_positions(store):
    cid = store.create(messages=[user("one")])["id"]
    store.append(cid, [assistant("two"), user("three")])
    after = store.append(cid, [assistant("four")])
    assert texts(after) == ["one", "two", "three", "four"]
    assert after["updated"] >= after["created"]


def test_truncate_for_regenerate(store):
    cid = store.create(messages=[user("q1"), assistant("a1"), user("q2"), assistant("a2")])["id"]
    assert store.truncate(cid, 3) == 1
    assert texts(store.get(cid)) == ["q1", "a1", "q2"]
    assert texts(store.append(cid, [assistant("a2 again")])) == ["q1", "a1", "q2", "a2 again"]
    assert store.truncate(cid, 10) == 0
    with pytest.raises(VlchatError, match="keep"):
        store.truncate(cid, -1)
    with pytest.raises(NotFound):
        store.truncate("conv_missing", 0)


def test_update_including_system_none(store):
    cid = store.create(system="Be brief.", template="chatml", settings={"a": 1})["id"]
    updated = store.update(cid, title="Renamed", settings={"b": 2})
    assert (updated["title"], updated["system"], updated["settings"]) == ("Renamed", "Be brief.", {"b": 2})
    assert store.update(cid)["system"] == "Be brief."  # omitted: unchanged
    cleared = store.update(cid, system=None)
    assert cleared["system"] is None and cleared["template"] == "chatml" and cleared["title"] == "Renamed"
    with pytest.raises(VlchatError, match="title"):
        store.update(cid, title="x" * 201)
    with pytest.raises(NotFound):
        store.update("conv_missing", title="x")


def test_delete_cascades_messages(store):
    keep = store.create(messages=[user("stay")])["id"]
    cid = store.create(messages=[user("a"), assistant("b")])["id"]
    assert store.delete(cid) is True
    assert store.delete(cid) is False
    with sqlite3.connect(store.path) as conn:
        rows = conn.execute("SELECT conversation_id FROM messages").fetchall()
    assert rows == [(keep,)]


def test_not_found(store):
    for call in (lambda: store.get("conv_nope"), lambda: store.append("conv_nope", [user("x")])):
        with pytest.raises(NotFound, match="conv_nope"):
            call()
    assert issubclass(NotFound, VlchatError)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"role": "tool", "parts": []}, "role"),
        ({"role": "user", "parts": "hi"}, "parts"),
        ({"role": "user", "parts": [{"type": "audio"}]}, "part"),
        ({"role": "user", "parts": [{"type": "image", "key": "../../etc/passwd", "path": None}]}, "part"),
    ],
)
def test_bad_message_rejected_and_nothing_written(store, bad, match):
    cid = store.create(messages=[user("first")])["id"]
    before = store.get(cid)
    with pytest.raises(VlchatError, match=match) as info:
        store.append(cid, [user("valid, but in the same batch"), bad])
    assert "\n" not in str(info.value)
    assert store.get(cid) == before
    with pytest.raises(VlchatError):  # create is one transaction too: no half-made conversation
        store.create(messages=[user("ok"), bad])
    assert [c["id"] for c in store.list()] == [cid]


def test_bad_fields_rejected(store):
    with pytest.raises(VlchatError, match="title"):
        store.create(title="x" * 201)
    with pytest.raises(VlchatError, match="settings"):
        store.create(settings={"f": object()})
    with pytest.raises(VlchatError, match="system"):
        store.create(system=3)
    assert store.list() == []


def test_title_from_first_user_message(store):
    long = "What colour is\nthe   square in this picture, and where is it placed?"
    cid = store.create(messages=[{"role": "system", "parts": [{"type": "text", "text": "sys"}]}])["id"]
    assert store.get(cid)["title"] == DEFAULT_TITLE
    title = store.append(cid, [user(long)])["title"]
    assert title.startswith("What colour is the square in") and "\n" not in title and len(title) <= 41
    assert store.append(cid, [user("something else")])["title"] == title  # only the first one names it
    chinese = "这张图片里有什么？请详细描述一下颜色、形状和位置，谢谢你的帮助以及耐心的解释和说明内容"
    named = store.create(messages=[user(chinese)])["title"]
    assert named.startswith("这张图片里有什么") and len(named) <= 41
    assert store.create(title="Mine", messages=[user("hello")])["title"] == "Mine"


def test_wal_mode_active(store):
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.integrity() == "ok"


def test_concurrent_appends_from_threads(store):
    cid = store.create()["id"]
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(25):
                store.append(cid, [user(f"t{n}-{i}")])
        except BaseException as e:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(texts(store.get(cid))) == sorted(f"t{n}-{i}" for n in range(4) for i in range(25))
    with sqlite3.connect(store.path) as conn:
        positions = [r[0] for r in conn.execute("SELECT position FROM messages ORDER BY position")]
    assert positions == list(range(100))


def test_reopen_keeps_everything(tmp_path):
    first = ConversationStore(tmp_path / "chat.db")
    cid = first.create(system="s", messages=[user("hi"), assistant("hello")])["id"]
    saved = first.get(cid)
    first.close()
    with ConversationStore(tmp_path / "chat.db") as again:
        assert again.get(cid) == saved and len(again.list()) == 1


def test_newer_schema_version_refused(tmp_path):
    ConversationStore(tmp_path / "chat.db").close()
    with sqlite3.connect(tmp_path / "chat.db") as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(VlchatError, match="cannot open conversation store.*schema version 99 is newer") as info:
        ConversationStore(tmp_path / "chat.db")
    assert "\n" not in str(info.value)


def test_not_a_database_refused(tmp_path):
    (tmp_path / "chat.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(VlchatError, match="cannot open conversation store"):
        ConversationStore(tmp_path / "chat.db")


def test_save_image_atomic_and_idempotent(store):
    image = Image.new("RGB", (8, 8), (200, 30, 40))
    path = Path(store.save_image(KEY, image))
    assert path == store.images_dir / f"{KEY}.png" == store.image_path(KEY)
    assert list(store.images_dir.iterdir()) == [path]  # no temporary file left behind
    with Image.open(path) as saved:
        assert saved.convert("RGB").getpixel((3, 3)) == (200, 30, 40)
    stamp = path.stat().st_mtime_ns
    assert store.save_image(KEY, Image.new("RGB", (8, 8))) == str(path)
    assert path.stat().st_mtime_ns == stamp  # content-addressed: never rewritten
    assert store.image_path(hashlib.sha256(b"other").hexdigest()) is None
    with pytest.raises(VlchatError, match="image key"):
        store.save_image("../escape", image)


CHILD = """
import sys
from vlchat.serve.store import ConversationStore
store = ConversationStore(sys.argv[1])
i = 0
while True:
    store.append(sys.argv[2], [{"role": "user", "parts": [{"type": "text", "text": f"m{i}"}]}])
    i += 1
    print(i, flush=True)  # printed only after the commit returned
"""


def test_sigkill_loses_no_committed_message(tmp_path):
    db = tmp_path / "chat.db"
    with ConversationStore(db) as s:
        cid = s.create(title="crash")["id"]
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(db), cid], cwd=REPO, stdout=subprocess.PIPE, text=True)
    watchdog = threading.Timer(120, child.kill)  # a hung child must fail the test, not hang it
    watchdog.start()
    try:
        committed = 0
        while committed < 150:
            line = child.stdout.readline()
            assert line, "the writer process died before committing enough messages"
            committed = int(line)
        os.kill(child.pid, signal.SIGKILL)  # mid-loop: most likely inside the next transaction
        child.wait()
    finally:
        watchdog.cancel()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    with ConversationStore(db) as s:
        assert s.integrity() == "ok"
        got = texts(s.get(cid))
    assert len(got) >= committed
    assert got == [f"m{i}" for i in range(len(got))]  # contiguous positions, in order
