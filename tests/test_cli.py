"""The real `vlchat` console script, driven as a subprocess (exit codes, stderr, stdout formats).

Bad input fails before the model loads (about 1.5 s a call); the few end-to-end calls load the
real default model (about 5 s each), so they are kept to three: --json, streaming, --batch.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EXAMPLES
from PIL import Image

CHELSEA = EXAMPLES / "chelsea.jpg"
COFFEE = EXAMPLES / "coffee.jpg"
QUESTION = "What is in this image?"
TIMING_KEYS = {"image_encode_ms", "ttft_s", "total_s", "decode_tok_s"}


def vlchat(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the installed console script (or `python -m vlchat.cli` if there is none)."""
    script = Path(sys.executable).with_name("vlchat")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "vlchat.cli"]
    return subprocess.run(
        command + list(args), input=stdin, capture_output=True, text=True, encoding="utf-8", timeout=timeout
    )


def assert_no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stdout + result.stderr, result.stderr


def assert_answer_record(record: dict) -> None:
    """The shape shared by `ask --json` and each good `ask --batch` line."""
    assert isinstance(record["answer"], str) and record["answer"].strip()
    assert record["finish_reason"] in {"stop", "length"}
    assert set(record["timings"]) == TIMING_KEYS
    assert all(isinstance(v, (int, float)) and v >= 0 for v in record["timings"].values())
    assert record["usage"]["prompt_tokens"] > 0
    assert record["usage"]["completion_tokens"] > 0


# --- bad input: exit 2, one "error: " line, no traceback, before the model loads ---------------


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> Path:
    """A folder of files that are not usable images (built here, nothing committed)."""
    folder = tmp_path_factory.mktemp("bad-files")
    (folder / "a-directory.jpg").mkdir()
    (folder / "notes.png").write_text("this is text, not a PNG\n")
    data = CHELSEA.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    # 400 M pixels in a few tens of KB: refused from the header, never decoded.
    Image.new("1", (20000, 20000)).save(folder / "bomb.png", optimize=True)
    (folder / "batch.jsonl").write_text(json.dumps({"question": "hi"}) + "\n")
    return folder


BAD_INPUTS = {
    # case id: (arguments with {bad} = the bad_files folder, {chelsea} = the example image)
    "missing image": ["ask", "-i", "{bad}/no-such.jpg", QUESTION],
    "directory as image": ["ask", "-i", "{bad}/a-directory.jpg", QUESTION],
    "text file named .png": ["ask", "-i", "{bad}/notes.png", QUESTION],
    "truncated jpeg": ["ask", "-i", "{bad}/truncated.jpg", QUESTION],
    "empty file": ["ask", "-i", "{bad}/empty.jpg", QUESTION],
    "decompression bomb": ["ask", "-i", "{bad}/bomb.png", QUESTION],
    "second image bad": ["ask", "-i", "{chelsea}", "-i", "{bad}/notes.png", QUESTION],
    "empty question": ["ask", "-i", "{chelsea}", ""],
    "blank question": ["ask", "-i", "{chelsea}", "   "],
    "no question": ["ask", "-i", "{chelsea}"],
    "temperature -1": ["ask", QUESTION, "--temperature", "-1"],
    "top_p 0": ["ask", QUESTION, "--top-p", "0"],
    "top_p 1.5": ["ask", QUESTION, "--top-p", "1.5"],
    "top_k -1": ["ask", QUESTION, "--top-k", "-1"],
    "num_beams 0": ["ask", QUESTION, "--num-beams", "0"],
    "max_new_tokens 0": ["ask", QUESTION, "--max-new-tokens", "0"],
    "repetition_penalty 0": ["ask", QUESTION, "--repetition-penalty", "0"],
    "temperature 2.5": ["ask", QUESTION, "--temperature", "2.5"],
    "frequency_penalty 3": ["ask", QUESTION, "--frequency-penalty", "3"],
    "presence_penalty -3": ["ask", QUESTION, "--presence-penalty", "-3"],
    "logit_bias without =": ["ask", QUESTION, "--logit-bias", "42"],
    "logit_bias not a number": ["ask", QUESTION, "--logit-bias", "42=lots"],
    "logit_bias 200": ["ask", QUESTION, "--logit-bias", "42=200"],
    "chat: logit_bias": ["chat", "--logit-bias", "x=1"],
    "serve: old prefix cache flag": ["serve", "--prefix-cache-tokens", "100", "--home", "{bad}"],
    "unknown template": ["ask", QUESTION, "--template", "no-such-template"],
    "unknown persona": ["ask", QUESTION, "--persona", "no-such-persona"],
    "system and persona": ["ask", QUESTION, "--system", "Be brief.", "--persona", "assistant"],
    "unknown model": ["ask", QUESTION, "--model", "no-such-model"],
    "batch and question": ["ask", "--batch", "{bad}/batch.jsonl", QUESTION],
    "batch and image": ["ask", "--batch", "{bad}/batch.jsonl", "-i", "{chelsea}"],
    "batch file missing": ["ask", "--batch", "{bad}/no-such.jsonl"],
    "chat: missing image": ["chat", "-i", "{bad}/no-such.jpg"],
    "chat: bomb": ["chat", "-i", "{bad}/bomb.png"],
    "chat: unknown persona": ["chat", "--persona", "no-such-persona"],
    "chat: top_p 0": ["chat", "--top-p", "0"],
    # placement: refused before the model loads, on any machine (cuda:99 exists nowhere; --device cpu)
    "ask: device cuda:99": ["ask", QUESTION, "--device", "cuda:99"],
    "chat: dtype float16 on cpu": ["chat", "--device", "cpu", "--dtype", "float16"],
    "agent: load-in 3bit": ["agent", QUESTION, "--load-in", "3bit"],
    "eval: device-map on cpu": ["eval", "--device", "cpu", "--device-map", "auto"],
    "serve: load-in 8bit on cpu": ["serve", "--device", "cpu", "--load-in", "8bit", "--home", "{bad}"],
}


@pytest.mark.parametrize("args", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_one_error_line_and_exit_2(args, bad_files):
    result = vlchat(*[a.format(bad=bad_files, chelsea=CHELSEA) for a in args], timeout=60)
    assert result.returncode == 2, result.stderr
    assert_no_traceback(result)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    "args", [["--bogus"], ["ask", "--bogus"], ["ask", "--temperature", "hot", "hi"], ["no-such-command"]]
)
def test_usage_errors_exit_2(args):
    result = vlchat(*args, timeout=60)
    assert result.returncode == 2
    assert_no_traceback(result)


@pytest.mark.parametrize(
    "args,expected",
    [
        ([], ["ask", "chat", "bench", "prepare"]),
        (
            ["ask"],
            ["--image", "--batch", "--json", "--temperature", "--top-p", "--num-beams", "--max-new-tokens"]
            + ["--frequency-penalty", "--presence-penalty", "--logit-bias"],
        ),
        (["serve"], ["--prefix-cache-mb"]),
        (["chat"], ["--image", "--persona", "--system", "--template", "--temperature", "/image"]),
        (["bench"], ["--json", "--tokens", "--model"]),
    ],
)
def test_help_lists_the_options(args, expected):
    result = vlchat(*args, "--help", timeout=60)
    assert result.returncode == 0, result.stderr
    assert_no_traceback(result)
    for word in expected:
        assert word in result.stdout, word


# --- end to end on the default model (3 model loads) ----------------------------------------


@pytest.fixture(scope="module")
def json_answer() -> dict:
    result = vlchat("ask", "-i", str(CHELSEA), QUESTION, "--max-new-tokens", "12", "--json")
    assert result.returncode == 0, result.stderr
    assert_no_traceback(result)
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


def test_ask_json(json_answer):
    assert set(json_answer) == {"answer", "finish_reason", "timings", "usage"}
    assert_answer_record(json_answer)
    assert json_answer["usage"]["completion_tokens"] <= 12


def test_ask_streams_text_about_two_images():
    result = vlchat(
        "ask", "-i", str(CHELSEA), "-i", str(COFFEE), "What do these two images show?", "--max-new-tokens", "8"
    )
    assert result.returncode == 0, result.stderr
    assert_no_traceback(result)
    assert result.stdout.endswith("\n") and result.stdout.strip(), result.stdout
    assert not result.stdout.lstrip().startswith("{")  # plain text, not --json


def test_ask_batch(tmp_path, json_answer):
    shutil.copy(CHELSEA, tmp_path / "cat.jpg")
    lines = [
        json.dumps({"image": "cat.jpg", "question": QUESTION}),  # relative to the batch file
        "{this is not json",
        "",
        json.dumps({"image": "missing.jpg", "question": QUESTION}),
        json.dumps({"id": "sky-7", "question": "What colour is the sky on a clear day?"}),
    ]
    batch = tmp_path / "questions.jsonl"
    batch.write_text("\n".join(lines) + "\n")
    # 12 tokens, as json_answer, so the greedy answers can be compared.
    result = vlchat("ask", "--batch", str(batch), "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr
    assert_no_traceback(result)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["line"] for r in records] == [1, 2, 4, 5]
    good, not_json, missing, text_only = records
    assert_answer_record(good)
    assert "error" not in good and "id" not in good
    assert set(not_json) == {"line", "error"} and "JSON" in not_json["error"]
    assert set(missing) == {"line", "error"}
    assert "not found" in missing["error"] and "missing.jpg" in missing["error"]
    assert text_only["id"] == "sky-7"
    assert_answer_record(text_only)
    # Greedy decoding is deterministic: the same question and image, in another process.
    assert good["answer"] == json_answer["answer"]
