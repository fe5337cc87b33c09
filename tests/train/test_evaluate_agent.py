"""Agent evaluation: scoring rules, the cases, the runner on scripted sessions, and the report."""

from __future__ import annotations

import json
import operator
from dataclasses import dataclass

import pytest

from tests.agent.agent_helpers import ScriptedSession, call
from vlchat.train import agent_cases
from vlchat.train.evaluate import markdown, write_report
from vlchat.train.evaluate_agent import (
    AGENT_SUITES,
    Runner,
    base_lm,
    contains_number,
    contains_text,
    evaluate_agent,
    names_any,
    numbers_in,
    same_value,
    selection_score,
    similarity,
    yes_no_template,
)

# --- scoring ----------------------------------------------------------------------------------------


def test_names_any_wants_a_whole_word_or_a_chinese_substring():
    cat = agent_cases.PHOTOS[0].accepted
    assert names_any("It is a tabby.", cat) and names_any("Two CATS sleeping", cat)
    assert names_any("这是一只猫。", cat)
    assert not names_any("A category of things", cat) and not names_any("python", cat)
    assert names_any("a Tiger  Cat", ("tiger cat",))


def test_contains_text_ignores_case_and_whitespace_only():
    assert contains_text('The sign says "No  parking".', "NO PARKING")
    assert contains_text("牌子上写着：禁止 停车", "禁止停车")
    assert not contains_text("NO PARK ING", "NO PARKING") and not contains_text("停车", "禁止停车")


def test_numbers_are_read_with_signs_and_thousands_separators():
    assert numbers_in("1,282 and -135 or 3.5") == [1282.0, -135.0, 3.5]
    assert contains_number("The answer is 1,282.", "1282") and contains_number("结果是-135。", "-135")
    assert not contains_number("12820", "1282") and not contains_number("no idea", "7")


def test_arguments_compare_numbers_as_numbers_and_strings_loosely():
    assert same_value("3", 3) and same_value(3.0, 3) and not same_value("three", 3) and not same_value(True, 1.5)
    assert same_value(" new  York", "New York") and not same_value("York", "New York") and not same_value(None, "x")


def test_selection_score():
    want = {"city": "Rome", "nights": 3}
    assert selection_score([], None, {}) == (True, True)
    assert selection_score([("book_hotel", "{}")], None, {}) == (False, False)
    assert selection_score([], "book_hotel", want) == (False, False)
    assert selection_score([("get_news", '{"topic": "x"}')], "book_hotel", want) == (False, False)
    assert selection_score([("book_hotel", '{"city": "rome", "nights": "3"}')], "book_hotel", want) == (True, True)
    assert selection_score([("book_hotel", '{"city": "Paris", "nights": 3}')], "book_hotel", want) == (True, False)
    assert selection_score([("book_hotel", "not json")], "book_hotel", want) == (True, False)


def test_yes_no_template_and_similarity():
    assert yes_no_template("It is blue, so no.") and yes_no_template("The sky has clouds, so yes")
    assert not yes_no_template("Yes, so it goes on.") and not yes_no_template("no")
    assert similarity("abc", "abc") == 1.0 and similarity("abc", "xyz") == 0.0


# --- the cases --------------------------------------------------------------------------------------


def test_math_cases_are_fixed_and_right():
    cases = agent_cases.math_cases()
    assert cases == agent_cases.math_cases() and len(cases) == 40
    ops = {"+": operator.add, "-": operator.sub, "×": operator.mul, "÷": operator.truediv}
    for case in cases:
        a, b = map(int, numbers_in(case.question.replace("-", " "))[:2])
        assert ops[case.meta["op"]](a, b) == int(case.expected[0])
    assert {c.group for c in cases} == {"agent_math/en", "agent_math/zh"}


def test_tool_selection_data_is_consistent():
    cases, functions = agent_cases.tool_selection_cases()
    needing = [c for c in cases if c.meta["call"]]
    assert len(cases) >= 60 and 0.6 <= len(needing) / len(cases) <= 0.7
    for case in cases:
        assert 2 <= len(case.meta["offered"]) <= 3 and set(case.meta["offered"]) <= set(functions)
        if case.meta["call"]:
            function = functions[case.meta["call"]]
            assert case.meta["call"] in case.meta["offered"]
            assert set(function["parameters"]["required"]) <= set(case.meta["arguments"])
            assert set(case.meta["arguments"]) <= set(function["parameters"]["properties"])
    training = {"get_weather", "read_text", "image_labels", "zoom", "python", "arxiv_search"}
    assert not training & set(functions)


def test_photos_imagenet_labels_exist():
    from vlchat.agent.builtin.labels import imagenet_labels

    labels = set(imagenet_labels())
    for photo in agent_cases.PHOTOS:
        assert set(photo.imagenet) <= labels, photo.name


def test_photo_cases_find_the_shipped_photos_and_make_variants():
    cases, notes = agent_cases.photo_cases()
    chelsea = [c for c in cases if c.meta["photo"] == "chelsea"]
    assert [c.meta["variant"] for c in chelsea] == [
        "original",
        "centre_crop",
        "flip",
        "jpeg30",
        "half_size",
        "original",
    ]
    assert chelsea[-1].group == "agent_photos/zh" and chelsea[0].meta["imagenet_class"]
    assert chelsea[4].image.size[0] == chelsea[0].image.size[0] // 2
    assert all("photos not found" in n for n in notes)


def test_signs_avoid_the_training_font_when_others_exist(monkeypatch):
    fonts = (("/f/DejaVuSans.ttf", "en|fr"), ("/f/Liberation-Regular.ttf", "en"), ("/f/Liberation-Italic.ttf", "en"))
    monkeypatch.setattr(agent_cases, "system_fonts", lambda: fonts)
    assert agent_cases.sign_fonts("en") == ["/f/Liberation-Regular.ttf"]
    assert agent_cases.sign_fonts("zh") == []
    monkeypatch.setattr(agent_cases, "system_fonts", lambda: fonts[:1])
    assert agent_cases.sign_fonts("en") == []  # only DejaVu Sans itself: none


def test_signs_without_a_chinese_font_are_skipped_with_a_note(monkeypatch):
    monkeypatch.setattr(agent_cases, "sign_fonts", lambda lang: [] if lang == "zh" else ["x.ttf"])
    monkeypatch.setattr(agent_cases, "render_sign", lambda text, font, colours: None)
    cases, notes = agent_cases.sign_cases()
    assert {c.group for c in cases} == {"agent_signs/en"} and len(cases) == 20
    assert notes and "zh signs skipped" in notes[0]


def test_spread_keeps_every_kind():
    assert agent_cases.spread(list(range(40)), 4) == [0, 10, 20, 30]
    assert agent_cases.spread([1, 2], 5) == [1, 2] and agent_cases.spread([1, 2], None) == [1, 2]


# --- the runner on scripted sessions -----------------------------------------------------------------


class FakeLM:
    def adapter_on(self, has_images: bool) -> bool:
        return has_images


def test_base_lm_turns_the_adapter_off_and_back():
    lm = FakeLM()
    with base_lm(lm):
        assert lm.adapter_on(True) is False
    assert lm.adapter_on(True) is True


class AnsweringSession(ScriptedSession):
    def answer(self, generation=None) -> str:
        for _ in self.stream():
            pass
        return self.messages[-1].content


@dataclass
class FakeModel:
    lm: FakeLM


class FakeChat:
    """Sessions answer from one script; the base-LM answers read the adapter flag at answer time."""

    def __init__(self, script: list[str]) -> None:
        self.script, self.model, self.adapter_seen = script, FakeModel(FakeLM()), []

    def session(self, template=None, system=None, generation=None) -> AnsweringSession:
        self.adapter_seen.append(self.model.lm.adapter_on(True))
        return AnsweringSession(self.script)


def test_the_agent_side_runs_the_loop_and_records_the_calls():
    script = [call("image_labels", '{"image": "image_1"}'), "It is a tabby cat.", "A dog."]
    chat = FakeChat(script)
    case = agent_cases.photo_cases()[0][0]
    rows = evaluate_agent_rows(chat, "agent_photos", [case])
    agent, plain = rows
    assert agent["side"] == "agent" and agent["called"] == ["image_labels"] and agent["watched_tool_called"]
    assert agent["score"] == 1.0 and plain["reply"] == "A dog." and plain["score"] == 0.0
    assert not script


def evaluate_agent_rows(chat, suite, cases):
    from vlchat.train.evaluate_agent import answer_suite

    return answer_suite(Runner(chat), suite, cases)


def test_evaluate_agent_writes_every_suite_into_the_report(tmp_path, monkeypatch):
    """All five suites on scripted answers (one case each): the table, eval.json and replies.jsonl."""
    photo = agent_cases.photo_cases()[0][0]
    monkeypatch.setattr(agent_cases, "photo_cases", lambda: ([photo], []))
    monkeypatch.setattr(agent_cases, "sign_cases", lambda: ([], ["zh signs skipped: no font"]))
    cases, functions = agent_cases.tool_selection_cases()
    monkeypatch.setattr(agent_cases, "tool_selection_cases", lambda: (cases[3:4], functions))
    script = [
        "A cat.",  # photos: agent
        "A cat.",  # photos: plain
        "It is 1282.",  # math: agent
        "1283",  # math: plain
        call("book_hotel", '{"city": "Rome", "nights": 3}'),  # tool_selection
        "Waves, so yes.",  # text_only: base LM (answered first)
        "Waves.",  # text_only: plain
        "Waves, so no.",  # text_only: tools
    ]
    chat = FakeChat(script)
    report = {"agent": evaluate_agent(chat, list(AGENT_SUITES), limit=1)}
    assert not script and chat.adapter_seen.count(False) == 1  # the base LM's session only
    summary = report["agent"]
    assert summary["agent_photos"]["summary"]["agent_photos/en"]["agent"]["score"] == 1.0
    assert summary["agent_math"]["summary"]["agent_math/en"]["plain"]["score"] == 0.0
    one_step = summary["tool_selection"]["summary"]["tool_selection/en"]["one_step"]
    assert one_step["selection"] == 1.0 and one_step["arguments_of_calls"] == 1.0
    text = summary["text_only"]["summary"]["text_only/en"]
    assert text["base_lm"]["same_as_base"] == 1.0 and text["plain"]["same_as_base"] == 0.0
    assert text["tools"]["yes_no_template"] == 1 and text["base_lm"]["yes_no_template"] == 1
    assert summary["agent_signs"]["notes"] == ["zh signs skipped: no font"]

    write_report(report, tmp_path, "agent")
    table = (tmp_path / "eval.md").read_text()
    assert "| agent_photos/en | 1 | 100.0% | 100.0% | image_labels 0% | 100% |" in table
    assert "| tool_selection/en | 1 | 100.0% | 100.0% |" in table and "zh signs skipped" in table
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert "replies" not in scores["agent"]["agent_math"] and scores["agent"]["agent_math"]["cases"] == 1
    rows = [json.loads(line) for line in (tmp_path / "replies.jsonl").read_text().splitlines()]
    assert len(rows) == 2 + 2 + 1 + 3 and {r["suite"] for r in rows} == set(AGENT_SUITES) - {"agent_signs"}
    assert markdown(report, "agent").startswith("# agent\n\n\n## Agent suites")


@pytest.mark.parametrize("bad", ["agent_fotos", "easy_vqa,nope"])
def test_the_cli_refuses_an_unknown_suite(bad):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "vlchat.cli", "eval", "--suites", bad], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "unknown suite" in result.stderr and "Traceback" not in result.stderr


def test_each_way_of_asking_keeps_one_session_with_a_new_conversation_per_case():
    chat = FakeChat(["A cat.", "A mug.", "A cat.", "A mug."])
    runner, cases = Runner(chat), agent_cases.photo_cases()[0][:2]
    replies = [runner.agent(case)["reply"] for case in cases] + [runner.plain(case)["reply"] for case in cases]
    assert replies == ["A cat.", "A mug.", "A cat.", "A mug."] and len(chat.adapter_seen) == 2
    session = runner.sessions["agent:" + ",".join(runner.tools)]
    assert [m.role for m in session.messages] == ["user", "assistant"]  # the second case's conversation only
