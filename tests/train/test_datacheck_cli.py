"""`vlchat data check`: every problem with its location and exit 2, or "no problems" and exit 0.

It loads only the tokenizer of the model (the default one here: SmolLM2's, from its local cache).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def vlchat(*args: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("vlchat")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "vlchat.cli"]
    return subprocess.run(command + list(args), capture_output=True, text=True, encoding="utf-8", timeout=300, cwd=REPO)


def good(i: int, image: str = "a.png") -> dict:
    return {
        "id": f"s{i}",
        "image": image,
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the square?"},
            {"from": "gpt", "value": "It is red."},
        ],
    }


@pytest.fixture
def folder(tmp_path) -> Path:
    Image.new("RGB", (16, 16), (200, 30, 40)).save(tmp_path / "a.png")
    return tmp_path


def test_every_problem_with_its_location(folder):
    items = [
        good(0),
        good(1, image="missing.png"),
        {"id": "s2", "image": "a.png"},  # no conversations
        good(3),
        {
            "id": "s4",
            "image": "a.png",
            "conversations": [  # the marker is in an answer
                {"from": "human", "value": "What is it?"},
                {"from": "gpt", "value": "<image> a square"},
            ],
        },
    ]
    path = folder / "llava.json"
    path.write_text(json.dumps(items, indent=1))
    result = vlchat("data", "check", str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == f"{path}: item 1: image not found: {folder / 'missing.png'}"
    assert lines[1] == f"{path}: item 2: missing key 'conversations'"
    assert lines[2].startswith(f"{path}: item 4: ") and "<image>" in lines[2]
    assert len(lines) == 3 and "no problems" not in result.stdout
    assert result.stderr.strip().splitlines() == [f"error: 3 problem(s) in {path}"]


def test_too_long_samples(folder):
    path = folder / "llava.json"
    path.write_text(
        json.dumps(
            [
                good(0),
                {
                    **good(1),
                    "conversations": [
                        {"from": "human", "value": "<image>\nDescribe it."},
                        {"from": "gpt", "value": "red " * 200},
                    ],
                },
            ]
        )
    )
    result = vlchat("data", "check", str(path), "--max-tokens", "120")
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{path}: item 1: too long: "), result.stdout
    assert lines[0].endswith("limit 120")


def test_clean_dataset(folder):
    path = folder / "llava.json"
    path.write_text(json.dumps([good(0), good(1)]))
    result = vlchat("data", "check", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines() == [f"{path}: no problems"]
    assert "error" not in result.stderr


def test_unusable_spec(tmp_path):
    result = vlchat("data", "check", str(tmp_path / "nothing.json"))
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [f"error: dataset not found: {tmp_path / 'nothing.json'}"]
