"""Chat templates: messages -> prompt text split into segments, shared by training and inference.

After litgpt's `prompts.py` (a tiny `PromptStyle` per model family plus stop strings) and
torchtune's per-message `masked` flag: one object renders the prompt for inference and the label
mask for training, so the two can never drift apart.

A template renders a list of `Segment`s. Each message's raw content (`Message.content`, images as
`<Img><ImageHere></Img>`) is its own segment, separate from the role markers around it, because
the chat engine tokenizes segment by segment: a growing conversation then keeps the same token
prefix (KV-cache reuse), and the engine can put the generated token ids of an assistant answer in
place of its content segment. Training puts loss on the `trainable` segments only: assistant
content and the end marker the model must learn to emit so that generation stops.

Segment layout of one conversation (markers in brackets are separate segments):

    [bos] [system prefix] S [system suffix]
    [user prefix] U [user suffix] [assistant prefix] A [assistant end*] [assistant tail] ...
    [assistant prefix]   <- the generation prompt, when the last message is a user message

(* trainable, with A). Empty markers are left out; content segments are always present.

Function calling (chat/tools.py, format by `Template.tool_format`): the tool list is a marker
segment in or after the system turn, an assistant message's calls a trainable marker segment
after its content, and each `tool` message a result turn; the generation prompt follows a user
or a tool message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from vlchat.chat.messages import Message
from vlchat.chat.tools import ToolSpec, get_format
from vlchat.errors import VlchatError

# MiniGPT-4's vision system prompt (minigpt4/conversation/conversation.py, CONV_VISION_Vicuna0
# and CONV_VISION_LLama2): https://github.com/Vision-CAIR/MiniGPT-4
MINIGPT4_SYSTEM = (
    "Give the following image: <Img>ImageContent</Img>. "
    "You will be able to see the image once I provide it to you. Please answer my questions."
)


@dataclass(frozen=True)
class Segment:
    """A piece of the rendered prompt.

    `message_index` is the message the text belongs to (role markers belong to their message);
    it is None only for a template's default system prompt, which is not in the messages, and it
    is `len(messages)` for the generation prompt (the index the coming answer will take), so that
    the generation prompt equals the assistant-prefix segment of the longer conversation.
    """

    text: str
    trainable: bool  # loss goes here: assistant content and the assistant's end marker
    message_index: int | None
    is_content: bool  # text is exactly messages[message_index].content


@dataclass(frozen=True)
class Template:
    name: str
    default_system: str
    stop: tuple[str, ...]  # stop strings for generation
    system_prefix: str = ""
    system_suffix: str = ""
    user_prefix: str = ""
    user_suffix: str = ""
    assistant_prefix: str = ""
    assistant_end: str = ""  # trainable: the model learns to emit it, generation stops on it
    assistant_tail: str = ""  # not trainable: separator after the end marker (chatml's "\n")
    bos: str = ""  # once, before everything (InternLM2's "<s>")
    # Prefix of the user message right after a system block; None = `user_prefix`. LLaMA-2 opens
    # "[INST]" inside the system block, so the first user message continues it with "".
    first_user_prefix: str | None = None
    # How an image part is written around its embedding slots, and what joins a message's parts
    # (MiniGPT-4: "<Img>" slots "</Img>", parts joined by " "; LLaVA-1.5: slots "\n", nothing between).
    image_open: str = "<Img>"
    image_close: str = "</Img>"
    part_separator: str = " "
    # Every image of the conversation goes first, as its embedding slots alone, before the BOS and
    # all text (BLIP-2: Blip2Processor puts the Q-Former's query embeddings in front of the prompt);
    # a message's text parts are then joined by `part_separator`. Rendered text is unchanged.
    images_first: bool = False
    # The text after each image is tokenized on its own, as a prompt's start (MiniGPT-4's
    # `get_context_emb` splits the prompt at `<ImageHere>` and tokenizes each piece alone).
    split_at_images: bool = False
    tool_format: str = "generic"  # how tools, calls and results are written (chat/tools.py FORMATS)

    def segments(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, tools: Sequence[ToolSpec] = ()
    ) -> list[Segment]:
        """Render `messages` (offering `tools`) as segments; see the module docstring for the layout."""
        first_turn = _check_roles(messages)
        out = self._system_segments(messages, tools)
        after_system = bool(out)
        for i in range(first_turn, len(messages)):
            if messages[i].role == "tool":
                out += self._result_segments(messages, i)
                continue
            out += self._turn_segments(i, messages[i], after_system and i == first_turn)
        if add_generation_prompt and messages and messages[-1].role in ("user", "tool"):
            out += _markers([(self.assistant_prefix, False)], len(messages))
        if out and self.bos:
            out.insert(0, Segment(self.bos, False, out[0].message_index, False))
        return out

    @property
    def image_markup(self) -> tuple[str, str, str]:
        return self.image_open, self.image_close, self.part_separator

    def render(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, tools: Sequence[ToolSpec] = ()
    ) -> str:
        return "".join(s.text for s in self.segments(messages, add_generation_prompt, tools))

    def _system_segments(self, messages: Sequence[Message], tools: Sequence[ToolSpec] = ()) -> list[Segment]:
        if messages and messages[0].role == "system":
            text, index, is_content = messages[0].content, 0, True
        else:
            text, index, is_content = self.default_system, None, False
        fmt = get_format(self.tool_format)
        inline = fmt.tools_text(tools, bool(text)) if tools and fmt.tools_turn is None else ""
        out = []
        if text or inline:  # an empty system message (and no tools) means no system prompt at all
            content = [Segment(text, False, index, is_content)] if text else []
            out = (
                _markers([(self.system_prefix, False)], index)
                + content
                + _markers([(inline, False), (self.system_suffix, False)], index)
            )
        if tools and fmt.tools_turn is not None:
            prefix, suffix = fmt.tools_turn
            out += _markers([(prefix, False), (fmt.tools_text(tools, False), False), (suffix, False)], index)
        return out

    def _result_segments(self, messages: Sequence[Message], index: int) -> list[Segment]:
        """A tool message as a result: in a turn of its own, or sharing one with its neighbours."""
        fmt = get_format(self.tool_format)
        prefix = self.user_prefix if fmt.result_prefix is None else fmt.result_prefix
        suffix = self.user_suffix if fmt.result_suffix is None else fmt.result_suffix
        first = not fmt.merge_results or messages[index - 1].role != "tool"
        last = not fmt.merge_results or index + 1 == len(messages) or messages[index + 1].role != "tool"
        return (
            _markers([(prefix if first else "", False), (fmt.result_open, False)], index)
            + [Segment(messages[index].content, False, index, True)]
            + _markers([(fmt.result_close, False), (suffix if last else "\n", False)], index)
        )

    def _turn_segments(self, index: int, message: Message, after_system: bool) -> list[Segment]:
        if message.role == "user":
            prefix = self.user_prefix
            if after_system and self.first_user_prefix is not None:
                prefix = self.first_user_prefix
            return (
                _markers([(prefix, False)], index)
                + [Segment(message.content, False, index, True)]
                + _markers([(self.user_suffix, False)], index)
            )
        return (
            _markers([(self.assistant_prefix, False)], index)
            + [Segment(message.content, True, index, True)]
            + _markers([(self._calls_text(message), True)], index)
            + _markers([(self.assistant_end, True), (self.assistant_tail, False)], index)
        )

    def _calls_text(self, message: Message) -> str:
        if not message.tool_calls:
            return ""
        return get_format(self.tool_format).calls_text(message.tool_calls, bool(message.content))


def _markers(parts: list[tuple[str, bool]], index: int | None) -> list[Segment]:
    """Marker segments (never content) for the non-empty texts in `parts`."""
    return [Segment(text, trainable, index, False) for text, trainable in parts if text]


def _check_roles(messages: Sequence[Message]) -> int:
    """Raise VlchatError unless messages are [system] user, assistant, user, ... (an assistant
    message with tool calls followed by one or more tool messages, then the assistant again or a
    user); return the first turn's index."""
    for i, m in enumerate(messages):
        if m.role == "system" and i != 0:
            raise VlchatError(f"a system message may only come first, but message {i} is a system message")
    first = 1 if messages and messages[0].role == "system" else 0
    for i in range(first, len(messages)):
        previous = messages[i - 1] if i > first else None
        allowed = _allowed_after(previous)
        if messages[i].role not in allowed:
            if previous is None or previous.role in ("user", "assistant") and not previous.tool_calls:
                expected = "user" if previous is None or previous.role == "assistant" else "assistant"
                raise VlchatError(
                    f"messages must alternate user and assistant, starting with user; "
                    f"message {i} is {messages[i].role!r} where {expected!r} was expected"
                )
            raise VlchatError(
                f"message {i} is {messages[i].role!r} where {' or '.join(map(repr, allowed))} was expected "
                "(tool messages answer the tool calls of the assistant message before them)"
            )
    return first


def _allowed_after(previous: Message | None) -> tuple[str, ...]:
    if previous is None:
        return ("user",)
    if previous.role == "user":
        return ("assistant",)
    if previous.role == "assistant":
        return ("tool",) if previous.tool_calls else ("user",)
    return ("tool", "assistant", "user")  # after a tool result


# ChatML as in SmolLM2-Instruct and Qwen2.5 (tokenizer_config.json chat_template).
_CHATML = Template(
    name="chatml",
    default_system=(
        "You are a helpful assistant. You can see images the user shares with you and answer questions about them."
    ),
    stop=("<|im_end|>",),
    system_prefix="<|im_start|>system\n",
    system_suffix="<|im_end|>\n",
    user_prefix="<|im_start|>user\n",
    user_suffix="<|im_end|>\n",
    assistant_prefix="<|im_start|>assistant\n",
    assistant_end="<|im_end|>",
    assistant_tail="\n",
    tool_format="hermes",
)

TEMPLATES: dict[str, Template] = {
    # MiniGPT-4's CONV_VISION_Vicuna0 (SeparatorStyle.SINGLE, sep "###"):
    # "S###Human: U###Assistant: A###Human: U2###Assistant: ". MiniGPT-4 always writes
    # system + sep; our choice for an empty system is to drop both, so the prompt starts "Human: "
    # rather than with a stray "###".
    "vicuna_v0": Template(
        name="vicuna_v0",
        default_system=MINIGPT4_SYSTEM,
        stop=("###",),
        system_suffix="###",
        user_prefix="Human: ",
        user_suffix="###",
        assistant_prefix="Assistant: ",
        assistant_end="###",
    ),
    # Meta's LLaMA-2 chat format (llama/generation.py, chat_completion):
    # "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nU [/INST] A </s><s>[INST] U2 [/INST] ".
    # MiniGPT-4's CONV_VISION_LLama2 uses roles "<s>[INST] " / " [/INST] " with the system prompt
    # in front and no <<SYS>> block; we follow Meta's format, which the chat model was tuned on.
    "llama2": Template(
        name="llama2",
        default_system=MINIGPT4_SYSTEM,
        stop=("</s>",),
        system_prefix="<s>[INST] <<SYS>>\n",
        system_suffix="\n<</SYS>>\n\n",
        user_prefix="<s>[INST] ",
        first_user_prefix="",
        assistant_prefix=" [/INST] ",
        assistant_end=" </s>",
    ),
    "chatml": _CHATML,
    # Qwen2.5 (-Coder) Instruct: ChatML with Qwen's default system prompt (its tokenizer_config.json
    # chat_template); tools in the Hermes format its template writes. It also ends on <|endoftext|>
    # (generation_config.json's second EOS; seen after a call here).
    "qwen2.5": replace(
        _CHATML,
        name="qwen2.5",
        default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
        stop=("<|im_end|>", "<|endoftext|>"),
    ),
    # InternLM2-chat: ChatML after a BOS "<s>" (internlm2-chat-7b tokenizer_config.json; the
    # default system is the first sentence of its meta_instruction).
    "internlm2": replace(
        _CHATML,
        name="internlm2",
        default_system="You are an AI assistant whose name is InternLM (书生·浦语).",
        bos="<s>",
        tool_format="internlm2",
    ),
    # BLIP-2 (OPT): "Question: U Answer:" as in the Salesforce/blip2-opt-* model cards, the image
    # embeddings in front of "</s>" (OPT's BOS; Blip2Processor). A finished answer ends with "</s>"
    # (OPT's EOS, also its BOS), and the next turn starts after it: "...Answer: A</s>Question: U2 Answer:".
    "blip2": Template(
        name="blip2",
        default_system="",
        stop=("</s>",),
        system_suffix="\n",
        user_prefix="Question: ",
        user_suffix=" ",
        assistant_prefix="Answer:",
        assistant_end="</s>",
        bos="</s>",
        images_first=True,
    ),
    # InstructBLIP (Vicuna): the instruction as it is, as in the Salesforce/instructblip-vicuna-* model
    # cards; InstructBlipProcessor puts the query embeddings first, then the text with LLaMA's BOS. It
    # was tuned on single instructions: a finished answer ends with "</s>" and a follow-up question
    # comes right after it ("<s>U A</s>U2"); a given system prompt goes first as "S\n".
    "instructblip": Template(
        name="instructblip",
        default_system="",
        stop=("</s>",),
        system_suffix="\n",
        assistant_end="</s>",
        bos="<s>",
        images_first=True,
    ),
    # Ziya-LLaMA / Ziya-Visual (IDEA-CCNL model cards): "<human>:U\n<bot>:A\n<human>:U2\n<bot>:",
    # tokenized with LLaMA's BOS in front (the cards call `tokenizer(inputs)`, which adds it);
    # no default system; a given one goes first as "S\n". The model also stops on "</s>".
    # Ziya-Visual's image (BLIP-2's query embeddings) goes first, before the BOS, as BLIP-2 generates:
    # an assumption, its `chat()` code being on the model hub only (model/loaders/ziya.py).
    "ziya": Template(
        name="ziya",
        default_system="",
        bos="<s>",
        stop=("<human>:", "</s>"),
        system_suffix="\n",
        user_prefix="<human>:",
        user_suffix="\n",
        assistant_prefix="<bot>:",
        assistant_end="\n",
        images_first=True,
    ),
    # MiniGPT-4's own demo prompts (conversation.py), for its release files (model/loaders/minigpt4.py):
    # CONV_VISION_Vicuna0 "S###Human: U###Assistant: " after the BOS its tokenizer adds to the first
    # piece; the text after an image is tokenized alone (split_at_images), as get_context_emb does.
    "minigpt4_vicuna0": Template(
        name="minigpt4_vicuna0",
        default_system=MINIGPT4_SYSTEM,
        stop=("###",),
        bos="<s>",
        system_suffix="###",
        user_prefix="Human: ",
        user_suffix="###",
        assistant_prefix="Assistant: ",
        assistant_end="###",
        split_at_images=True,
    ),
    # CONV_VISION_LLama2: "S" then "<s>[INST] U [/INST] A" per turn, no separators, no <<SYS>> block;
    # answers end with the EOS "</s>" (MiniGPT-4's end_sym), which is not re-rendered in the history.
    "minigpt4_llama2": Template(
        name="minigpt4_llama2",
        default_system=MINIGPT4_SYSTEM,
        stop=("</s>",),
        bos="<s>",
        user_prefix="<s>[INST] ",
        assistant_prefix=" [/INST] ",
        split_at_images=True,
    ),
}
