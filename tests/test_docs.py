"""The docs stay true to the code.

- docs/cli.md documents every `vlchat` command and option that the click command tree of
  `vlchat.cli.app` holds, and nothing else. Its convention: one heading `## vlchat <command path>`
  per leaf command (`## vlchat ask`, `## vlchat train stage1`); in that section, each table row's
  first cell names one parameter in backticks: options as every spelling (`` `--image`, `-i` ``,
  `` `--resume`, `--no-resume` ``), positional arguments in capitals (`` `QUESTION` ``,
  `` `OVERRIDES...` ``).
- Every `vlchat ...` command line in the code of README.md and docs/*.md (fenced blocks and inline
  code) names an existing command and only options that command accepts.
- Every relative link in README.md and docs/*.md resolves to a file, and a `#anchor` to a heading
  of the target (GitHub's slugs).
- README.md is at most 300 lines and opens with the `make demo` / `make test` block.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import typer

from vlchat.cli import app

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CLI_DOC = REPO / "docs" / "cli.md"
MARKDOWN = [README, *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 300

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
COMMAND_HEADING = re.compile(r"^## vlchat ([a-z0-9 _-]+?)[ \t]*$", re.M)
# A command line that runs vlchat: `vlchat <args>`, `.venv/bin/vlchat <args>`, `KEY=v vlchat <args>`
# at the start of a line or code span, or `python -m vlchat.cli <args>` / `torchrun ... -m vlchat.cli`
# anywhere in it; not `vlchat-default`, `vlchat/examples`, or a table header that says vlchat.
INVOCATION = re.compile(r"(?:^(?:\$ )?(?:[A-Z_]+=\S* )*(?:\S*/)?|\s-m )vlchat(?:\.cli)?[ \t]+(.+)")
END_OF_COMMAND = {"#", "&&", ";", ">", "2>", "||"}


# --- the command tree ------------------------------------------------------------------------


# typer carries its own copy of click (typer._click), so commands and parameters are told apart by
# what they have (`commands`, `param_type_name`) rather than by click's classes.
Command = Any


def is_group(command: Command) -> bool:
    return isinstance(getattr(command, "commands", None), dict)


def command_tree(root: Command | None = None) -> dict[str, Command]:
    """Every command by its path under `vlchat`: 'ask', 'train', 'train stage1', ..."""
    root = root or typer.main.get_command(app)
    found: dict[str, Command] = {}

    def walk(group: Command, prefix: str) -> None:
        for name, command in group.commands.items():
            path = f"{prefix} {name}".strip()
            found[path] = command
            if is_group(command):
                walk(command, path)

    walk(root, "")
    return found


def option_names(command: Command) -> set[str]:
    """Every spelling of every option (`--image`, `-i`, `--no-resume`), without --help."""
    names = set()
    for param in command.params:
        if param.param_type_name == "option":
            names.update(param.opts + param.secondary_opts)
    return names - {"--help"}


def argument_names(command: Command) -> set[str]:
    return {param.name.upper() for param in command.params if param.param_type_name == "argument"}


# --- docs/cli.md -------------------------------------------------------------------------------


def command_sections(text: str) -> dict[str, str]:
    """'ask' -> the text under `## vlchat ask`, up to the next level-2 heading."""
    sections = {}
    for match in COMMAND_HEADING.finditer(text):
        rest = text[match.end() :]
        following = re.search(r"^## ", rest, re.M)
        sections[match.group(1).strip()] = rest[: following.start()] if following else rest
    return sections


def documented_parameters(section: str) -> tuple[set[str], set[str]]:
    """(options, arguments) named in the first cells of the section's table rows."""
    options, arguments = set(), set()
    for line in section.splitlines():
        cells = line.strip().strip("|").split("|")
        if not line.lstrip().startswith("|") or not cells:
            continue
        for token in INLINE_CODE.findall(cells[0]):
            token = token.strip()
            if token.startswith("-"):
                options.add(token)
            elif re.fullmatch(r"[A-Z][A-Z_]*(\.\.\.)?", token):
                arguments.add(token.removesuffix("..."))
    return options, arguments


def cli_doc_problems(tree: dict[str, Command], text: str) -> list[str]:
    """What docs/cli.md lacks or invents, one line each."""
    problems = []
    sections = command_sections(text)
    for path, command in tree.items():
        if is_group(command):
            continue
        if path not in sections:
            problems.append(f"no '## vlchat {path}' section")
            continue
        options, arguments = documented_parameters(sections[path])
        problems += [f"vlchat {path}: {name} is not documented" for name in sorted(option_names(command) - options)]
        problems += [
            f"vlchat {path}: {name} is documented but does not exist"
            for name in sorted(options - option_names(command))
        ]
        problems += [
            f"vlchat {path}: argument {name} is not documented" for name in sorted(argument_names(command) - arguments)
        ]
        problems += [
            f"vlchat {path}: argument {name} does not exist" for name in sorted(arguments - argument_names(command))
        ]
    problems += [f"'## vlchat {path}' names no command" for path in sections if path not in tree]
    return problems


# --- command lines anywhere in the docs ---------------------------------------------------------


def code_lines(text: str) -> list[str]:
    """The lines of fenced code blocks (continuation backslashes joined) and every inline code span."""
    lines = []
    for block in FENCE.finditer(text):
        body = block.group(0).split("\n")[1:-1]
        lines += "\n".join(body).replace("\\\n", " ").split("\n")
    prose = FENCE.sub("", text)
    lines += INLINE_CODE.findall(prose)
    return lines


def invocation_problems(tree: dict[str, Command], line: str) -> list[str]:
    """Problems with each `vlchat ...` command line in `line`: unknown commands or options."""
    problems = []
    for match in INVOCATION.finditer(line):
        tokens = match.group(1).split()
        commands, rest = resolve_commands(tree, tokens)
        if commands is None:
            problems.append(f"unknown command in `{match.group(0).strip()}`")
            continue
        for token in rest:
            if token in END_OF_COMMAND:
                break
            name = token.strip("[](),.").split("=")[0]
            if re.fullmatch(r"--?[a-zA-Z][\w-]*", name) and name != "--help":
                for path in commands:
                    if name not in option_names(tree[path]):
                        problems.append(f"vlchat {path} has no option {name} (`{match.group(0).strip()}`)")
    return problems


def resolve_commands(tree: dict[str, Command], tokens: list[str]) -> tuple[list[str] | None, list[str]]:
    """The command paths the leading tokens name ('train stage1|stage2' names two) and the tokens
    after them; ([], tokens) for a placeholder (`vlchat <command>`, `vlchat --help`), None if unknown."""
    paths = [""]
    for i, token in enumerate(tokens):
        if not all(is_group(tree.get(p)) or p == "" for p in paths):
            return [p for p in paths if p], tokens[i:]
        if token.startswith(("<", "[", "-")) or token in END_OF_COMMAND:
            return [p for p in paths if p and not is_group(tree[p])], tokens[i:]
        names = token.split("|")
        candidates = [f"{p} {n}".strip() for p in paths for n in names]
        if not all(c in tree for c in candidates):
            return None, []
        paths = candidates
    return [p for p in paths if p and not is_group(tree[p])], []


# --- links ---------------------------------------------------------------------------------------


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a Markdown file's headings, duplicates numbered as GitHub does (-1, -2)."""
    seen: dict[str, int] = {}
    found = set()
    for match in HEADING.finditer(FENCE.sub("", text)):
        slug = github_slug(match.group(2))
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def link_problems(path: Path, root: Path = REPO) -> list[str]:
    """Relative links of `path` whose file is missing or whose `#anchor` names no heading."""
    text = path.read_text(encoding="utf-8")
    problems = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}: ({target})"
        if not linked.exists():
            problems.append(f"{where} points to a missing file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text(encoding="utf-8")):
            problems.append(f"{where} names no heading of {linked.relative_to(root)}")
    return problems


# --- the tests -----------------------------------------------------------------------------------


def test_cli_doc_covers_every_command_and_option():
    assert cli_doc_problems(command_tree(), CLI_DOC.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: p.name)
def test_command_lines_in_the_docs_exist(path):
    tree = command_tree()
    problems = [p for line in code_lines(path.read_text(encoding="utf-8")) for p in invocation_problems(tree, line)]
    assert problems == []


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: p.name)
def test_relative_links_resolve(path):
    assert link_problems(path) == []


def test_readme_is_short_and_opens_with_the_two_commands():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"
    opening = [line for line in lines[:8] if line.strip() and not line.startswith("# ")]
    assert opening[:4] == ["```", "make demo", "make test", "```"]


# --- the checks can fail -------------------------------------------------------------------------


def test_an_undocumented_option_is_caught():
    root = typer.main.get_command(app)
    tree = command_tree(root)
    fake = copy.copy(tree["ask"].params[-1])  # an option like the others, under a new name
    fake.opts, fake.secondary_opts = ["--made-up-option"], []
    tree["ask"].params.append(fake)
    try:
        problems = cli_doc_problems(tree, CLI_DOC.read_text(encoding="utf-8"))
    finally:
        tree["ask"].params.pop()
    assert problems == ["vlchat ask: --made-up-option is not documented"]


def test_a_documented_option_or_command_that_does_not_exist_is_caught():
    text = CLI_DOC.read_text(encoding="utf-8")
    text = text.replace("## vlchat ask\n", "## vlchat ask\n\n| `--made-up-option` | invented |\n", 1)
    text += "\n## vlchat frobnicate\n"
    problems = cli_doc_problems(command_tree(), text)
    assert "vlchat ask: --made-up-option is documented but does not exist" in problems
    assert "'## vlchat frobnicate' names no command" in problems


def test_a_bad_command_line_is_caught():
    tree = command_tree()
    assert invocation_problems(tree, "vlchat ask --image a.png --made-up-option x") == [
        "vlchat ask has no option --made-up-option (`vlchat ask --image a.png --made-up-option x`)"
    ]
    assert invocation_problems(tree, "vlchat frobnicate --json") == ["unknown command in `vlchat frobnicate --json`"]
    assert invocation_problems(tree, "vlchat train stage1|stage3 --config x") != []
    assert invocation_problems(tree, "torchrun -m vlchat.cli train stage2 --config x --resume") == []
    assert invocation_problems(tree, "vlchat chat [--system TEXT | --persona NAME]  # comment --nope") == []


def test_a_broken_link_is_caught(tmp_path):
    assert github_slug("vlchat train stage1") == "vlchat-train-stage1"
    assert github_slug("The default model: training and evaluation (measured here)") == (
        "the-default-model-training-and-evaluation-measured-here"
    )
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "cli.md").write_text(CLI_DOC.read_text(encoding="utf-8"), encoding="utf-8")
    page = tmp_path / "docs" / "page.md"
    page.write_text("[a](missing.md) [b](cli.md#no-such-heading) [c](cli.md#vlchat-ask) [d](https://x.y/z)\n")
    assert link_problems(page, tmp_path) == [
        "docs/page.md: (missing.md) points to a missing file",
        "docs/page.md: (cli.md#no-such-heading) names no heading of docs/cli.md",
    ]
