"""A checkpoint's own chat template (the Jinja `chat_template` of its tokenizer or processor) as a
vlchat `Template`.

vlchat renders prompts as segments (chat/templates.py) so that training masks and KV-cache reuse
work; a Jinja template is a program. This module runs the Jinja template on probe conversations
whose texts are unique sentinels, reads the role markers from between the sentinels, builds the
segment Template, and then checks it: re-rendering the probes with the Template must give the Jinja
output exactly, else a VlchatError says the template does not fit (use --template).

Name form: `hf:<checkpoint dir>` (ModelConfig.template), resolved lazily by `get_template`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from vlchat.chat.messages import Message
from vlchat.chat.templates import Template
from vlchat.errors import VlchatError

SYSTEM, USER1, ASSISTANT1, USER2 = "SYSXQZ", "USRAQZ", "ASTAQZ", "USRBQZ"  # sentinels no template contains


@lru_cache(maxsize=16)
def checkpoint_template(directory: str) -> Template:
    """The Template of the checkpoint at `directory` (cached per directory)."""
    from transformers import AutoTokenizer

    path = Path(directory)
    try:
        # never the checkpoint's own code (and never transformers' interactive prompt about it)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise VlchatError(f"cannot read the tokenizer of {path}: {str(error).splitlines()[0]}") from None
    jinja = read_chat_template(path, tokenizer)
    template = template_from_jinja(jinja, tokenizer, path.name, image_token(path, tokenizer))
    return replace(template, name=f"hf:{directory}")  # the name get_template resolves again (saved sessions)


def read_chat_template(directory: Path, tokenizer) -> str:
    """The processor's template (chat_template.jinja / chat_template.json) if any, else the tokenizer's."""
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text()
    if (directory / "chat_template.json").is_file():
        return json.loads((directory / "chat_template.json").read_text())["chat_template"]
    if isinstance(tokenizer.chat_template, str) and tokenizer.chat_template:
        return tokenizer.chat_template
    raise VlchatError(
        f"{directory} has no chat template (tokenizer chat_template or chat_template.jinja); pass --template"
    )


def image_token(directory: Path, tokenizer) -> str | None:
    """The text of the image placeholder token of a VLM checkpoint (LLaVA's "<image>"), if any."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    index = config.get("image_token_index", config.get("image_token_id"))
    return tokenizer.convert_ids_to_tokens(index) if isinstance(index, int) else None


class _Renderer:
    """Renders probe conversations with the Jinja template, in the content format it accepts."""

    def __init__(self, jinja: str, tokenizer) -> None:
        self.jinja, self.tokenizer, self.as_list = jinja, tokenizer, True
        try:  # multimodal templates take content as a list of typed parts; text templates a string
            probe = self.render([("user", USER1)], False)
        except Exception:  # a Jinja template may raise anything on content it does not expect
            probe = None
        self.as_list = probe is not None and probe.count(USER1) == 1 and "'type'" not in probe

    def render(self, turns: list[tuple[str, str]], generation: bool, image: bool = False) -> str:
        messages = []
        for role, text in turns:
            content = [{"type": "text", "text": text}] if self.as_list else text
            if image and role == "user":
                content = [{"type": "image"}, *content]
            messages.append({"role": role, "content": content})
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.jinja, tokenize=False, add_generation_prompt=generation
        )


def template_from_jinja(jinja: str, tokenizer, name: str, image: str | None = None) -> Template:
    """Read the markers out of probe renders, build a Template, and check it renders the same."""
    r = _Renderer(jinja, tokenizer)
    single = r.render([("user", USER1)], False)
    with_prompt = r.render([("user", USER1)], True)
    if USER1 not in single or not with_prompt.startswith(single):
        raise _misfit(name, "its generation prompt is not appended after the conversation")
    assistant_prefix = with_prompt[len(single) :]
    head, user_suffix = single.split(USER1)
    two = r.render([("user", USER1), ("assistant", ASSISTANT1), ("user", USER2)], False)
    between = _between(two, ASSISTANT1, USER2, name)
    end, tail, user_prefix = _split_turn_end(between, head, tokenizer)
    bos = _bos(head, tokenizer, processor_tokenizes=image is not None)
    system = _system_markers(r, user_prefix, bos, name)
    default_system = _default_system(head, bos, user_prefix, system, name)
    markup = _image_markup(r, head, image, name) if image else {}
    template = Template(
        name=f"hf:{name}",
        default_system=default_system,
        stop=tuple(dict.fromkeys(s for s in (end.strip(), tokenizer.eos_token) if s)),
        system_prefix=system[0],
        system_suffix=system[1],
        user_prefix=user_prefix,
        user_suffix=user_suffix,
        assistant_prefix=assistant_prefix,
        assistant_end=end,
        assistant_tail=tail,
        bos=bos,
        first_user_prefix=system[2],
        **markup,
    )
    _check(template, r, name, "" if head.startswith(bos) else bos)
    return template


def _between(text: str, first: str, second: str, name: str) -> str:
    if first not in text or second not in text.split(first, 1)[1]:
        raise _misfit(name, "a two-turn conversation does not render its messages in order")
    return text.split(first, 1)[1].split(second, 1)[0]


def _split_turn_end(between: str, head: str, tokenizer) -> tuple[str, str, str]:
    """What follows an answer before the next user text = end marker + tail + user prefix. The end
    marker is the special token it starts with (ChatML's <|im_end|>), the tail the whitespace after it,
    and the user prefix the rest (it also ends the first turn's head)."""
    specials = sorted(
        {str(t) for t in tokenizer.all_special_tokens} | {str(t) for t in tokenizer.get_added_vocab()}, key=len
    )
    end = next((s for s in reversed(specials) if s and between.startswith(s)), "")
    rest = between[len(end) :]
    tail = rest[: len(rest) - len(rest.lstrip())]
    user_prefix = rest[len(tail) :]
    if not head.endswith(user_prefix):
        user_prefix = _common_suffix(rest, head)
        tail = rest[: len(rest) - len(user_prefix)]
    return end, tail, user_prefix


def _common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return a[len(a) - n :]


def _bos(head: str, tokenizer, processor_tokenizes: bool) -> str:
    """The BOS text: rendered by the template, or added by the tokenizer itself (LLaMA's add_bos)
    where the reference tokenizes the rendered prompt with special tokens: a VLM's processor does,
    `apply_chat_template` does not."""
    bos = tokenizer.bos_token or ""
    if bos and head.startswith(bos):
        return bos
    if bos and processor_tokenizes and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        return bos
    return ""


def _system_markers(r: _Renderer, user_prefix: str, bos: str, name: str) -> tuple[str, str, str | None]:
    """(system prefix, system suffix, first user prefix after a system block or None)."""
    text = r.render([("system", SYSTEM), ("user", USER1)], False)
    if SYSTEM not in text:
        return "", "", None  # the template drops system messages
    before, after = text.split(SYSTEM, 1)
    prefix = before[len(bos) :] if before.startswith(bos) else before
    chunk = after.split(USER1, 1)[0]
    if chunk.endswith(user_prefix):
        return prefix, chunk[: len(chunk) - len(user_prefix)], None
    return prefix, chunk, ""


def _default_system(head: str, bos: str, user_prefix: str, system: tuple[str, str, str | None], name: str) -> str:
    """The system prompt the template writes when the conversation has none ("" for none)."""
    body = head[len(bos) :] if head.startswith(bos) else head
    if body == user_prefix:
        return ""
    first_user = user_prefix if system[2] is None else system[2]
    if body.startswith(system[0]) and body.endswith(system[1] + first_user):
        return body[len(system[0]) : len(body) - len(system[1] + first_user)]
    raise _misfit(name, "its default system prompt could not be located")


def _image_markup(r: _Renderer, head: str, image: str, name: str) -> dict[str, str]:
    """How an image part renders before the text (LLaVA: "<image>\\n")."""
    if not r.as_list:
        raise _misfit(name, "it takes no image content, but the model is a vision-language model")
    text = r.render([("user", USER1)], False, image=True)
    markup = text[len(head) :].split(USER1, 1)[0] if text.startswith(head) else ""
    if markup.count(image) != 1:
        raise _misfit(name, f"an image does not render as one {image!r} before the text")
    open_, close = markup.split(image)
    return {"image_open": open_, "image_close": close, "part_separator": ""}


def _check(template: Template, r: _Renderer, name: str, added_bos: str) -> None:
    """The Template must render the probes exactly as the Jinja template does (after the BOS that
    the tokenizer adds itself, when the template does not write it)."""
    probes = [
        ([("user", USER1)], True),
        ([("system", SYSTEM), ("user", USER1)], True),
        ([("user", USER1), ("assistant", ASSISTANT1), ("user", USER2)], True),
    ]
    for turns, generation in probes:
        expected = added_bos + r.render(turns, generation)
        messages = [Message.text_message(role, text) for role, text in turns]
        if turns[0][0] == "system" and SYSTEM not in expected:
            continue
        got = template.render(messages, generation)
        if got != expected and not _answer_spacing_only(got, expected, template):
            raise _misfit(name, f"renders {expected!r} where the segment form gives {got!r}")


def _answer_spacing_only(got: str, expected: str, template: Template) -> bool:
    """LLaVA's template writes "ASSISTANT: " before a past answer but "ASSISTANT:" as the generation
    prompt; the model emits the space itself, so the segment form keeps the generation prompt."""
    return got.replace(template.assistant_prefix + ASSISTANT1, template.assistant_prefix + " " + ASSISTANT1) == expected


def _misfit(name: str, why: str) -> VlchatError:
    return VlchatError(
        f"the chat template of {name} does not fit vlchat's segment templates ({why}); pass --template NAME"
    )
