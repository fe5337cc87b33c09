"""Agent evaluation for `vlchat eval --suite agent_photos,agent_signs,agent_math,tool_selection,text_only`.

Every case runs THROUGH THE AGENT LOOP users run: a fresh `ChatSession` of one `Chat`, a `ToolExecutor`
over the built-in tools `vlchat agent` offers by default (all five), and `Agent` with the CLI's
`AgentConfig()` (tool_choice "auto", max_steps 5); greedy decoding. Beside it, the same question in a
plain chat (no tools: what `vlchat ask` answers). The cases: train/agent_cases.py.

Scores (each tested in tests/train/test_evaluate_agent.py):
- agent_photos: the reply names one of the photo's accepted names (`names_any`); also whether
  image_labels was called and whether an ImageNet-1k class names the object at all.
- agent_signs: the reply contains the sign's text (`contains_text`: case and whitespace ignored).
- agent_math: the reply contains the result as a number (`contains_number`); also whether python was called.
- tool_selection: one model step with the request's 2-3 functions offered, tool_choice "auto":
  selection right (a call when one is needed, with the right name; none when none is) and arguments
  right (each required argument equal after `same_value`).
- text_only: each prompt answered (a) in a plain text chat, (b) with the web UI's Tools switch on
  (the agent loop with the server's default tools: read_text, image_labels, zoom) and (c) by the base
  LM alone (the LoRA adapter forced off, `base_lm`): exact-match rate and mean difflib ratio of (a)
  and (b) against (c), and the replies in the yes/no reason template ("..., so yes.").
"""

from __future__ import annotations

import difflib
import json
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from vlchat.agent.builtin import BUILTIN_TOOLS
from vlchat.agent.executor import ToolExecutor
from vlchat.agent.loop import Agent, AgentConfig, collect
from vlchat.agent.tools import ToolContext
from vlchat.chat.tools import ToolSpec
from vlchat.config import GenerationConfig
from vlchat.train import agent_cases
from vlchat.train.agent_cases import Case

AGENT_SUITES = ("agent_photos", "agent_signs", "agent_math", "tool_selection", "text_only")
WEB_UI_TOOLS = ("read_text", "image_labels", "zoom")  # serve/serving.py's agent_tools: the Tools switch
WATCHED_TOOL = {"agent_photos": "image_labels", "agent_signs": "read_text", "agent_math": "python"}
AGENT_MAX_NEW_TOKENS = 96  # per step: room for a call with its arguments, or a short answer
SELECTION_MAX_NEW_TOKENS = 64  # a call with three arguments is about 45 tokens
TEXT_MAX_NEW_TOKENS = 48  # text_only compares replies to the base LM's: their start tells (and the tools side is slow)

# --- scoring ---------------------------------------------------------------------------------------


def squash(text: str) -> str:
    """Lower case, runs of whitespace as one space; none at all between CJK characters."""
    text = re.sub(r"\s+", " ", text).strip().casefold()
    return re.sub(r"(?<=[\u2e80-\uffff]) (?=[\u2e80-\uffff])", "", text)


def names_any(reply: str, names: tuple[str, ...]) -> bool:
    """Whether the reply names one of `names`: a whole word (or words) for Latin names ("cat", not
    "category"; "cats" counts), a substring for Chinese ones."""
    low = squash(reply)
    for name in names:
        name = squash(name)
        if re.search(r"[\u2e80-\uffff]", name):
            if name in low:
                return True
        elif re.search(rf"(?<![a-z]){re.escape(name)}(?:s|es)?(?![a-z])", low):
            return True
    return False


def contains_text(reply: str, text: str) -> bool:
    """The sign's text appears in the reply, ignoring case and whitespace runs (and quotes around it)."""
    return squash(text) in squash(reply)


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def numbers_in(text: str) -> list[float]:
    """Every number written in the text, "1,234" as 1234 and "-5" as -5."""
    out = []
    for found in NUMBER.findall(text):
        try:
            out.append(float(found.replace(",", "")))
        except ValueError:
            continue
    return out


def contains_number(reply: str, value: str) -> bool:
    return float(value) in numbers_in(reply)


def same_value(got: Any, want: Any) -> bool:
    """An argument equals the expected one: numbers as numbers ("3" == 3 == 3.0), strings after squash."""
    if isinstance(want, (int, float)) and not isinstance(want, bool):
        try:
            return float(got) == float(want)
        except (TypeError, ValueError):
            return False
    return isinstance(got, str) and squash(got) == squash(str(want))


def selection_score(calls: list[tuple[str, str]], want: str | None, arguments: dict) -> tuple[bool, bool]:
    """(selection right, arguments right) for one step's calls [(name, JSON arguments)]: a request
    that needs no call is right without any; one that needs a call is right when the first call
    names the function, and its arguments are right when every expected one is equal."""
    if want is None:
        return not calls, not calls
    if not calls or calls[0][0] != want:
        return False, False
    try:
        got = json.loads(calls[0][1] or "{}")
    except json.JSONDecodeError:
        return True, False
    if not isinstance(got, dict):
        return True, False
    return True, all(same_value(got.get(key), value) for key, value in arguments.items())


YES_NO_TEMPLATE = re.compile(r",?\s*so (yes|no)\W*$", re.IGNORECASE)


def yes_no_template(reply: str) -> bool:
    """A reply in the trained yes/no reason template: "..., so yes." / "..., so no."."""
    return bool(YES_NO_TEMPLATE.search(reply.strip()))


def similarity(a: str, b: str) -> float:
    """difflib.SequenceMatcher ratio over characters (1.0 = the same text)."""
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


# --- running ---------------------------------------------------------------------------------------


@contextmanager
def base_lm(lm) -> Iterator[None]:
    """The LM with its LoRA adapter off for every sequence, whatever the engine's rule for turning it on
    (an instance attribute shadows `adapter_on`; without an adapter nothing changes)."""
    lm.adapter_on = lambda *args, **kwargs: False
    try:
        yield
    finally:
        del lm.adapter_on


def agent_registry(names: tuple[str, ...]):
    from vlchat.agent.cli import registry_of

    return registry_of(list(names))


class Runner:
    """Answers cases the ways the suites compare. Each case is a new conversation; each way of asking
    keeps one session of one `Chat` whose conversation is cleared between cases, so the KV cache of
    the prompt start that cases share (system prompt and tools, about 1,100 tokens with the agent's
    tools) is reused as within a conversation (chat/engine.py `_prefill`), not prefilled per case."""

    def __init__(self, chat, max_new_tokens: int = AGENT_MAX_NEW_TOKENS, tools: tuple[str, ...] = BUILTIN_TOOLS):
        self.chat, self.tools = chat, tools
        self.generation = GenerationConfig(max_new_tokens=max_new_tokens)  # greedy
        self.sessions: dict[str, object] = {}
        self.functions: dict[str, dict] = {}  # tool_selection's, by name

    def fresh(self, way: str, generation: GenerationConfig):
        """`way`'s session with an empty conversation (its KV cache kept for the shared prompt start)."""
        session = self.sessions.get(way)
        if session is None:
            session = self.sessions[way] = self.chat.session(generation=generation)
        session.messages = []
        session.tools, session.tool_choice, session.grammar_tools = (), "auto", None
        return session

    def agent(self, case: Case, tools: tuple[str, ...] | None = None) -> dict:
        """The `vlchat agent` path: reply, names of the tools called, steps, whether the answer was forced."""
        tools = tools or self.tools
        session = self.fresh("agent:" + ",".join(tools), self.generation)
        executor = ToolExecutor(agent_registry(tools), ToolContext())
        result = collect(Agent(session, executor, AgentConfig()).ask(case.question, [case.image] if case.image else []))
        calls = [s["name"] for s in result.steps if s["type"] == "tool_call"]
        return {"reply": result.answer, "called": calls, "forced": result.forced}

    def plain(self, case: Case, way: str = "plain") -> dict:
        """The `vlchat ask` path: the image (if any) then the question, no tools."""
        session = self.fresh(way, self.generation)
        if case.image is not None:
            session.upload_img(case.image)
        session.ask(case.question)
        return {"reply": session.answer()}

    def one_step(self, case: Case) -> dict:
        """One generation with the case's functions offered (tool_choice "auto"): its words and calls."""
        session = self.fresh("one_step", GenerationConfig(max_new_tokens=SELECTION_MAX_NEW_TOKENS))
        functions = self.functions
        session.tools = tuple(
            ToolSpec(n, functions[n]["description"], functions[n]["parameters"]) for n in case.meta["offered"]
        )
        session.ask(case.question)
        reply = session.answer()
        calls = [(c.name, c.arguments) for c in session.messages[-1].tool_calls]
        return {"reply": reply, "calls": calls}


def timed(run: Callable[[], dict]) -> dict:
    start = time.perf_counter()
    row = run()
    return {**row, "seconds": round(time.perf_counter() - start, 2)}


def answer_suite(
    runner: Runner, suite: str, cases: list[Case], progress: Callable[[str], None] | None = None
) -> list[dict]:
    """One row per case and side: group, question, expected, side, reply, score and the suite's extras."""
    rows, start = [], time.perf_counter()
    for done, case in enumerate(cases, 1):
        if progress is not None and done > 1:
            progress(f"{suite}: case {done}/{len(cases)} ({time.perf_counter() - start:.0f} s so far)")
        base = {"suite": suite, "group": case.group, "question": case.question, "expected": list(case.expected)}
        base.update({k: v for k, v in case.meta.items()})
        if suite == "tool_selection":
            rows.append(selection_row(base, case, timed(lambda c=case: runner.one_step(c))))
        elif suite == "text_only":
            rows += text_rows(runner, base, case)
        else:
            for side, run in (("agent", runner.agent), ("plain", runner.plain)):
                row = {**base, "side": side, **timed(lambda r=run, c=case: r(c))}
                row["score"] = float(case_right(suite, row["reply"], case.expected))
                if "called" in row:
                    row["watched_tool_called"] = WATCHED_TOOL[suite] in row["called"]
                rows.append(row)
    return rows


def case_right(suite: str, reply: str, expected: tuple[str, ...]) -> bool:
    if suite == "agent_photos":
        return names_any(reply, expected)
    if suite == "agent_signs":
        return contains_text(reply, expected[0])
    return contains_number(reply, expected[0])


def selection_row(base: dict, case: Case, row: dict) -> dict:
    selection, arguments = selection_score(row["calls"], case.meta["call"], case.meta["arguments"])
    return {
        **base,
        "side": "one_step",
        **row,
        "selection": selection,
        "arguments_right": arguments,
        "score": float(selection),
    }


def text_rows(runner: Runner, base: dict, case: Case) -> list[dict]:
    base_row = timed(lambda: run_base(runner, case))
    rows = [
        {**base, "side": "plain", **timed(lambda: runner.plain(case))},
        {**base, "side": "tools", **timed(lambda: runner.agent(case, WEB_UI_TOOLS))},
        {**base, "side": "base_lm", **base_row},
    ]
    for row in rows:
        row["same_as_base"] = row["reply"] == base_row["reply"]
        row["similarity"] = round(similarity(row["reply"], base_row["reply"]), 4)
        row["yes_no_template"] = yes_no_template(row["reply"])
        row["score"] = float(row["same_as_base"])
    return rows


def run_base(runner: Runner, case: Case) -> dict:
    with base_lm(runner.chat.model.lm):
        return runner.plain(case, way="base_lm")


# --- the suites and their summaries ----------------------------------------------------------------


def suite_cases(suite: str, limit: int | None) -> tuple[list[Case], list[str], dict]:
    """(cases, notes, functions) of one suite, at most `limit` cases (evenly spread)."""
    notes, functions = [], {}
    if suite == "agent_photos":
        cases, notes = agent_cases.photo_cases()
    elif suite == "agent_signs":
        cases, notes = agent_cases.sign_cases()
    elif suite == "agent_math":
        cases = agent_cases.math_cases()
    elif suite == "tool_selection":
        cases, functions = agent_cases.tool_selection_cases()
    else:
        cases = agent_cases.text_cases()
    cases = agent_cases.spread(cases, limit)
    if suite == "tool_selection":  # the cases offering the same functions in a row: they share a prompt start
        cases.sort(key=lambda c: c.meta["offered"])
    return cases, notes, functions


def evaluate_agent(
    chat,
    suites: list[str],
    limit: int | None,
    max_new_tokens: int = AGENT_MAX_NEW_TOKENS,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """{suite: {"summary", "notes", "seconds", "seconds_per_case", "replies"}} for the agent suites asked for;
    `progress` gets a line before each case after the first (the CLI prints them on stderr)."""
    report = {}
    for suite in [s for s in AGENT_SUITES if s in suites]:
        runner = Runner(chat, TEXT_MAX_NEW_TOKENS if suite == "text_only" else max_new_tokens)
        cases, notes, runner.functions = suite_cases(suite, limit)
        start = time.perf_counter()
        rows = answer_suite(runner, suite, cases, progress)
        seconds = time.perf_counter() - start
        report[suite] = {
            "summary": summarise(rows),
            "notes": notes,
            "cases": len(cases),
            "seconds": round(seconds, 1),
            "seconds_per_case": round(seconds / max(1, len(cases)), 1),
            "replies": rows,
        }
    return report


def summarise(rows: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """{group: {side: {metric: value}}}: each metric the mean over the rows that have it."""
    sums: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for row in rows:
        for metric in (
            "score",
            "watched_tool_called",
            "selection",
            "arguments_right",
            "similarity",
            "yes_no_template",
            "same_as_base",
            "seconds",
        ):
            if metric in row:
                sums[row["group"]][row["side"]][metric].append(float(row[metric]))
        if row.get("imagenet_class") is not None:
            sums[row["group"]][row["side"]]["imagenet_class"].append(float(row["imagenet_class"]))
        if row["suite"] == "tool_selection" and row["call"] is not None:  # arguments over the calls needed
            sums[row["group"]][row["side"]]["arguments_of_calls"].append(float(row["arguments_right"]))
    out: dict = {}
    for group, sides in sorted(sums.items()):
        out[group] = {
            side: {"n": len(m["score"]), **{k: round(sum(v) / len(v), 4) for k, v in m.items()}}
            for side, m in sides.items()
        }
        for side, m in sides.items():  # the yes/no template is a count, not a share
            if "yes_no_template" in m:
                out[group][side]["yes_no_template"] = int(sum(m["yes_no_template"]))
    return out


def markdown_agent(report: dict) -> list[str]:
    """The agent suites' tables (Markdown lines)."""
    if not report:
        return []
    lines = ["", "## Agent suites", "", AGENT_NOTE]
    if any(suite in report for suite in WATCHED_TOOL):
        lines += [
            "",
            "| suite | cases | agent (tools) | plain chat (no tools) | watched tool called | has an ImageNet class |",
            "|---|---:|---:|---:|---:|---:|",
        ]
    for suite in ("agent_photos", "agent_signs", "agent_math"):
        for group, sides in report.get(suite, {}).get("summary", {}).items():
            agent, plain = sides.get("agent", {}), sides.get("plain", {})
            watched = f"{WATCHED_TOOL[suite]} {agent.get('watched_tool_called', 0):.0%}"
            imagenet = f"{agent['imagenet_class']:.0%}" if "imagenet_class" in agent else "—"
            lines.append(
                f"| {group} | {agent.get('n', 0)} | {agent.get('score', 0):.1%} | "
                f"{plain.get('score', 0):.1%} | {watched} | {imagenet} |"
            )
    if "tool_selection" in report:
        lines += [
            "",
            "| tool_selection | requests | selection right | arguments right (requests that need a call) |",
            "|---|---:|---:|---:|",
        ]
        for group, sides in report["tool_selection"]["summary"].items():
            s = sides["one_step"]
            args = f"{s['arguments_of_calls']:.1%}" if "arguments_of_calls" in s else "—"
            lines.append(f"| {group} | {s['n']} | {s['selection']:.1%} | {args} |")
    if "text_only" in report:
        lines += [
            "",
            "| text_only | prompts | side | same as base LM | mean difflib ratio to base LM | "
            "yes/no-template replies |",
            "|---|---:|---|---:|---:|---:|",
        ]
        for group, sides in report["text_only"]["summary"].items():
            for side in ("plain", "tools", "base_lm"):
                s = sides[side]
                lines.append(
                    f"| {group} | {s['n']} | {TEXT_SIDES[side]} | {s['same_as_base']:.1%} | "
                    f"{s['similarity']:.3f} | {s['yes_no_template']} |"
                )
    lines.append("")
    for suite, part in report.items():
        lines.append(
            f"- {suite}: {part['cases']} cases in {part['seconds']} s ({part['seconds_per_case']} s a case, "
            "all sides)" + "".join(f"; {n}" for n in part["notes"])
        )
    return lines


TEXT_SIDES = {"plain": "(a) plain text chat", "tools": "(b) Tools switch on", "base_lm": "(c) base LM, adapter off"}
AGENT_NOTE = (
    "Agent: the `vlchat agent` loop (all five built-in tools, tool_choice auto, max 5 calling steps, greedy). "
    "Plain chat: the same question as `vlchat ask` answers it. tool_selection: one step, the request's 2-3 "
    "functions offered, tool_choice auto. text_only similarity: difflib.SequenceMatcher ratio over characters."
)
