"""`vlchat <command>`: one function per command; the signature is the CLI, the docstring the help.

Every user-fixable problem is a VlchatError, printed as one line with exit code 2.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from vlchat.cli_loading import Loading, loads_model
from vlchat.config import GenerationConfig
from vlchat.errors import VlchatError
from vlchat.model.loaders import model_config

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="vlchat: chat with a vision-language model about your images, on a CPU.",
)

# Options shared by the commands that generate (typer reads these annotations).
Images = Annotated[list[Path], typer.Option("--image", "-i", help="An image file (repeat for several).")]
Template = Annotated[str | None, typer.Option(help="Conversation template (default: the model's).")]
System = Annotated[str | None, typer.Option(help="System prompt; '' for none (default: the template's).")]
Persona = Annotated[str | None, typer.Option(help="A system-prompt preset: assistant, zhubajie, chinese.")]
Model = Annotated[
    str,
    typer.Option(
        help="Model: a preset, a model directory, or a name from `vlchat models` (HF cache, $VLCHAT_HOME/models)."
    ),
]
Temperature = Annotated[float, typer.Option(help="0 = greedy; > 0 samples.")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling mass, in (0, 1].")]
TopK = Annotated[int, typer.Option(help="Sample among the k likeliest tokens (0 = off).")]
MaxNew = Annotated[int, typer.Option(help="Most tokens to generate.")]
MinNew = Annotated[int, typer.Option(help="Fewest tokens to generate before stopping is allowed.")]
RepPenalty = Annotated[float, typer.Option(help="> 1 discourages repeating tokens.")]
Beams = Annotated[int, typer.Option(help="Beam search width (1 = off).")]
Seed = Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")]
Stop = Annotated[list[str], typer.Option("--stop", help="Extra stop string (repeatable).")]
FreqPenalty = Annotated[
    float, typer.Option(help="-2..2: lowers a token's logit by this times its count in the answer.")
]
PresPenalty = Annotated[float, typer.Option(help="-2..2: lowers a token's logit by this once it is in the answer.")]
LogitBias = Annotated[
    list[str], typer.Option("--logit-bias", help="TOKEN_ID=BIAS added to that token's logit, -100..100 (repeatable).")
]
Tools = Annotated[Path | None, typer.Option(help="A JSON list of tools (OpenAI's 'tools' field) the model may call.")]
ToolChoice = Annotated[str, typer.Option(help="auto | required | none | a function name (with --tools).")]
JsonSchema = Annotated[Path | None, typer.Option(help="A JSON Schema file the answer must follow.")]


def calling_options(tools: Path | None, tool_choice: str, json_schema: Path | None) -> dict:
    """ChatSession fields for --tools / --tool-choice / --json-schema, files read and checked now."""
    from vlchat.chat.tools import load_tools, read_json_file

    if tools is None and tool_choice != "auto":
        raise VlchatError("--tool-choice needs --tools")
    fields: dict = {}
    if tools is not None:
        fields["tools"], fields["tool_choice"] = load_tools(tools), tool_choice
    if json_schema is not None:
        schema = read_json_file(json_schema, "JSON Schema file")
        if not isinstance(schema, dict):
            raise VlchatError(f"{json_schema}: a JSON Schema must be a JSON object")
        fields["json_schema"] = schema
    return fields


def generation_config(
    temperature: float,
    top_p: float,
    top_k: int,
    max_new_tokens: int,
    min_new_tokens: int,
    repetition_penalty: float,
    num_beams: int,
    seed: int | None,
    stop: list[str],
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    logit_bias: list[str] = (),
) -> GenerationConfig:
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        logit_bias=parse_logit_bias(logit_bias),
        num_beams=num_beams,
        stop=tuple(stop),
        seed=seed,
    )


def parse_logit_bias(items: list[str]) -> tuple[tuple[int, float], ...]:
    """["42=-100", "7=2.5"] -> ((42, -100.0), (7, 2.5)); a token given twice keeps its last bias."""
    bias: dict[int, float] = {}
    for item in items:
        token, sep, value = item.partition("=")
        try:
            bias[int(token)] = float(value)
        except ValueError:
            raise VlchatError(f"--logit-bias takes TOKEN_ID=BIAS, e.g. 42=-100, got {item!r}") from None
        if not sep:
            raise VlchatError(f"--logit-bias takes TOKEN_ID=BIAS, e.g. 42=-100, got {item!r}")
    return tuple(bias.items())


def system_prompt(system: str | None, persona: str | None) -> str | None:
    from vlchat.chat.personas import get_persona

    if system is not None and persona is not None:
        raise VlchatError("give either --system or --persona, not both")
    return get_persona(persona) if persona is not None else system


def open_model(model: str, loading: Loading | None = None, projector: str | None = None, adapter: str | None = None):
    """Load a preset (slow part) where `loading` says (--device, --dtype, ...), optionally with other
    projector weights (a `<stem>` path) and a LoRA adapter directory for the LM."""
    from vlchat.model.projector import read_projector_config
    from vlchat.model.vlm import load_model

    config = model_config(model)
    if projector is not None:
        config = replace(config, projector=read_projector_config(projector), projector_weights=projector)
    if adapter is not None:
        config = replace(config, lm=replace(config.lm, adapter=adapter))
    return load_model(loading.apply(config) if loading is not None else config)


def open_chat(model: str, loading: Loading | None = None):
    from vlchat.chat.engine import Chat

    return Chat(open_model(model, loading))


@app.command()
@loads_model
def chat(
    image: Images = [],
    template: Template = None,
    system: System = None,
    persona: Persona = None,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    top_k: TopK = 0,
    max_new_tokens: MaxNew = 256,
    min_new_tokens: MinNew = 0,
    repetition_penalty: RepPenalty = 1.0,
    num_beams: Beams = 1,
    seed: Seed = None,
    stop: Stop = [],
    tools: Tools = None,
    tool_choice: ToolChoice = "auto",
    json_schema: JsonSchema = None,
    frequency_penalty: FreqPenalty = 0.0,
    presence_penalty: PresPenalty = 0.0,
    logit_bias: LogitBias = [],
    model: Model = "default",
    loading: Loading | None = None,
) -> None:
    """Chat in the terminal, answers streamed. Commands: /image PATH, /result TEXT, /reset, /save FILE,
    /load FILE, /help, /exit."""
    from vlchat.chat.template_lookup import get_template
    from vlchat.images import load_image
    from vlchat.repl import repl

    config = generation_config(
        temperature,
        top_p,
        top_k,
        max_new_tokens,
        min_new_tokens,
        repetition_penalty,
        num_beams,
        seed,
        stop,
        frequency_penalty,
        presence_penalty,
        logit_bias,
    )
    system = system_prompt(system, persona)
    template and get_template(template)
    for path in image:  # refuse bad files before the slow load
        load_image(path)
    calling = calling_options(tools, tool_choice, json_schema)
    session = open_chat(model, loading).session(template, system, config)
    for name, value in calling.items():
        setattr(session, name, value)
    for path in image:
        session.upload_img(path)
    repl(session, [str(p) for p in image])


@app.command()
@loads_model
def ask(
    question: Annotated[str | None, typer.Argument(help="The question.")] = None,
    image: Images = [],
    batch: Annotated[
        Path | None,
        typer.Option(help='A JSONL file of {"image": PATH, "question": TEXT} lines (paths relative to the file).'),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON object with answer and timings.")] = False,
    template: Template = None,
    system: System = None,
    persona: Persona = None,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    top_k: TopK = 0,
    max_new_tokens: MaxNew = 256,
    min_new_tokens: MinNew = 0,
    repetition_penalty: RepPenalty = 1.0,
    num_beams: Beams = 1,
    seed: Seed = None,
    stop: Stop = [],
    tools: Tools = None,
    tool_choice: ToolChoice = "auto",
    json_schema: JsonSchema = None,
    frequency_penalty: FreqPenalty = 0.0,
    presence_penalty: PresPenalty = 0.0,
    logit_bias: LogitBias = [],
    model: Model = "default",
    loading: Loading | None = None,
) -> None:
    """Answer one question about the given image(s), or every line of a --batch file. With --tools the
    model may call them: each call prints as a JSON line {"id", "name", "arguments"}."""
    from vlchat.ask import answer_batch, answer_one

    config = generation_config(
        temperature,
        top_p,
        top_k,
        max_new_tokens,
        min_new_tokens,
        repetition_penalty,
        num_beams,
        seed,
        stop,
        frequency_penalty,
        presence_penalty,
        logit_bias,
    )
    system = system_prompt(system, persona)
    calling = calling_options(tools, tool_choice, json_schema)
    if batch is not None:
        if calling:
            raise VlchatError("--tools and --json-schema apply to one question, not to --batch")
        if question is not None or image:
            raise VlchatError("--batch takes its questions and images from the file; drop the others")
        answer_batch(batch, lambda: open_chat(model, loading), template, system, config)
    else:
        answer_one(question, image, lambda: open_chat(model, loading), template, system, config, json_output, calling)


@app.command()
@loads_model
def agent(
    question: Annotated[str | None, typer.Argument(help="The question (none: an interactive session).")] = None,
    image: Images = [],
    batch: Annotated[
        Path | None,
        typer.Option(help='A JSONL file of {"image": PATH, "question": TEXT} lines, as `vlchat ask --batch` reads.'),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object: answer, steps, usage.")] = False,
    tools: Annotated[
        str, typer.Option(help="Built-in tools, comma-separated: read_text, image_labels, zoom, python, arxiv_search.")
    ] = "all",
    tool_choice: Annotated[
        str, typer.Option(help="The first step's: auto | required | a tool name (forces a first call).")
    ] = "auto",
    max_steps: Annotated[int, typer.Option(help="Steps that may call tools before an answer is forced.")] = 5,
    template: Template = None,
    system: System = None,
    persona: Persona = None,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    top_k: TopK = 0,
    max_new_tokens: MaxNew = 256,
    min_new_tokens: MinNew = 0,
    repetition_penalty: RepPenalty = 1.0,
    seed: Seed = None,
    stop: Stop = [],
    model: Model = "default",
    loading: Loading | None = None,
) -> None:
    """Answer with tools: the model may call them, sees each result, then answers. No question: an
    interactive session (/image PATH, /reset, /help, /exit). Each call and result is shown."""
    from vlchat.agent import cli as agent_cli
    from vlchat.agent.loop import AgentConfig
    from vlchat.chat.template_lookup import get_template

    config = generation_config(
        temperature, top_p, top_k, max_new_tokens, min_new_tokens, repetition_penalty, 1, seed, stop
    )
    template and get_template(template)
    setup = agent_cli.AgentSetup(
        lambda: open_chat(model, loading),
        agent_cli.tool_names(tools),
        AgentConfig(max_steps=max_steps, tool_choice=tool_choice),
        template,
        system_prompt(system, persona),
        config,
    )
    if batch is not None:
        if question is not None or image or json_output:
            raise VlchatError("--batch takes its questions and images from the file and prints JSON; drop the others")
        agent_cli.answer_batch(setup, batch)
    elif question is not None:
        agent_cli.answer_one(setup, question, image, json_output)
    elif json_output:
        raise VlchatError("--json needs a question (or use --batch)")
    else:
        agent_cli.repl(setup, image)


@app.command()
def bench(
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    tokens: Annotated[int, typer.Option(help="Tokens decoded per measured turn.")] = 64,
    model: Model = "default",
) -> None:
    """Measure encode time, time-to-first-token (first and follow-up turns), decode speed and peak RSS,
    beside MiniGPT-4's way (re-prefill the whole conversation every turn) measured in the same run."""
    from vlchat.bench.decode import run_bench

    run_bench(model, tokens, json_output)


@app.command()
@loads_model
def serve(
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None, typer.Option(envvar="VLCHAT_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1.")
    ] = None,
    model: Annotated[
        str, typer.Option(help="Model preset, config file, model directory or `vlchat models` name.")
    ] = "default",
    image_dir: Annotated[Path | None, typer.Option(help="Allow local image paths under this folder.")] = None,
    allow_remote_images: Annotated[
        bool, typer.Option(help="Fetch http(s) image URLs (never private addresses).")
    ] = False,
    max_batch: Annotated[int, typer.Option(help="Requests decoded together.")] = 8,
    max_queue: Annotated[int, typer.Option(help="Requests waiting before 429.")] = 32,
    timeout: Annotated[float, typer.Option(help="Seconds a request may run.")] = 300.0,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body.")] = 32.0,
    max_image_mb: Annotated[float, typer.Option(help="Largest image (decoded file bytes).")] = 20.0,
    prefix_cache_mb: Annotated[
        float, typer.Option(help="Memory for KV caches kept for prefix reuse, measured from the tensors (0 = off).")
    ] = 384.0,
    prefix_cache_tokens: Annotated[
        int | None, typer.Option(hidden=True, help="Replaced by --prefix-cache-mb (refused with a message).")
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Default max_tokens when a request gives none.")] = 256,
    home: Annotated[
        Path | None, typer.Option(help="Conversation store folder (default $VLCHAT_HOME or ~/.vlchat).")
    ] = None,
    agent_tools: Annotated[
        str, typer.Option(help="Built-in tools requests may run on the server (vlchat_tools), comma-separated.")
    ] = "read_text,image_labels,zoom",
    loading: Loading | None = None,
) -> None:
    """Serve the OpenAI-compatible API (and stored conversations) with uvicorn."""
    from vlchat.agent.cli import tool_names
    from vlchat.serve.server import build_app, check_address
    from vlchat.serve.server import serve as run_server
    from vlchat.serve.serving import ServeConfig

    if image_dir is not None and not image_dir.is_dir():
        raise VlchatError(f"--image-dir {image_dir} is not a folder")
    if not 0 < port < 65536:
        raise VlchatError(f"--port must be 1..65535, got {port}")
    if prefix_cache_tokens is not None:
        raise VlchatError(
            "--prefix-cache-tokens is gone: the prefix cache is bounded in memory now; use --prefix-cache-mb "
            "(a token takes ~46 KB in float32 with the default model, ~23 KB in bfloat16)"
        )
    config = ServeConfig(
        model=model,
        api_key=api_key or None,
        image_dir=image_dir and image_dir.resolve(),
        allow_remote_images=allow_remote_images,
        max_body_mb=max_body_mb,
        max_image_mb=max_image_mb,
        max_batch=max_batch,
        max_queue=max_queue,
        timeout_s=timeout,
        prefix_cache_mb=prefix_cache_mb,
        default_max_tokens=max_tokens,
        home=home,
        agent_tools=tuple(tool_names(agent_tools)) if agent_tools.strip() else (),
    )
    preset = model_config(model)  # a bad name fails here, before the server starts
    check_address(host, port)
    run_server(build_app(config, lambda: open_chat(model, loading), preset.name, preset.template), host, port)


@app.command()
@loads_model
def prepare(model: Model = "default", loading: Loading | None = None) -> None:
    """Verify the packaged weights and build the LM cache (once), so later starts are fast."""
    import time

    start = time.perf_counter()
    config = open_chat(model, loading).model.config
    vision = config.vision.name if config.vision is not None else "none: text only"
    print(f"model {model!r} ready in {time.perf_counter() - start:.1f} s (vision {vision}, LM {config.lm.source})")


@app.command("eval")
@loads_model
def evaluate(
    projector: Annotated[
        str | None, typer.Option(help="Projector weights stem (e.g. runs/stage2/projector); default: the model's.")
    ] = None,
    adapter: Annotated[
        str | None, typer.Option(help="LoRA adapter directory from a `lm: lora` stage 2 (e.g. runs/stage2/lora).")
    ] = None,
    suite: Annotated[
        list[str],
        typer.Option(
            "--suite",
            "--suites",
            help="easy_vqa, synth, agent_photos, agent_signs, agent_math, tool_selection, text_only "
            "(repeatable or comma-separated).",
        ),
    ] = ["easy_vqa", "synth"],
    limit: Annotated[
        int | None,
        typer.Option(help="easy-vqa test questions, and cases per agent suite (evenly spread); all if unset."),
    ] = 1000,
    scenes: Annotated[int, typer.Option(help="Held-out synthetic scenes per language.")] = 200,
    lang: Annotated[list[str], typer.Option(help="Synthetic question languages: en, zh.")] = ["en", "zh"],
    out: Annotated[Path, typer.Option(help="Where eval.md and eval.json go.")] = Path("runs/eval"),
    batch_size: Annotated[int, typer.Option(help="Questions per batch.")] = 16,
    baseline: Annotated[
        bool, typer.Option(help="Also ask without the image (the base LM; the same for any projector/adapter).")
    ] = True,
    model: Model = "default",
    loading: Loading | None = None,
) -> None:
    """Exact-match VQA accuracy (easy-vqa test, held-out synthetic scenes per question type) and caption
    attribute recall, beside a text-only baseline (no image: the base LM, its LoRA adapter is on only with an
    image). The agent suites ask through the `vlchat agent` loop, beside a plain chat. Writes Markdown + JSON."""
    from vlchat.train.evaluate import AGENT_SUITES, VQA_SUITES, markdown, write_report
    from vlchat.train.evaluate import evaluate as run_eval

    suite = [name.strip() for item in suite for name in item.split(",") if name.strip()]
    unknown = set(suite) - set(VQA_SUITES + AGENT_SUITES) or set(lang) - {"en", "zh"}
    if unknown or not suite:
        raise VlchatError(
            f"unknown suite or language: {', '.join(sorted(unknown)) or '(none given)'}; "
            f"suites: {', '.join(VQA_SUITES + AGENT_SUITES)}"
        )

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    loaded = open_model(model, loading, projector, adapter)
    report = run_eval(loaded, suite, limit, scenes, lang, batch_size, progress=progress, baseline=baseline)
    weights = projector or "default model: projector + LoRA adapter"
    title = f"vlchat evaluation ({weights}{f', adapter {adapter}' if adapter else ''}; baseline: base LM, no image)"
    write_report(report, out, title)
    print(markdown(report, title))


@app.command("models")
def models(json_output: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False) -> None:
    """List the models --model accepts: presets, folders in $VLCHAT_HOME/models, and the Hugging Face cache."""
    import json
    from dataclasses import asdict

    from vlchat.hub import human_size, list_models

    entries = list_models()
    if json_output:
        print(json.dumps([asdict(e) for e in entries], indent=2))
        return
    width = max(len(e.name) for e in entries)
    for entry in entries:
        print(f"{entry.name:<{width}}  {entry.kind:<8}  {human_size(entry.size_bytes):>9}  {entry.path}")


@app.command("pull")
def pull(
    name: Annotated[str, typer.Argument(help="org/repo, or a short name (llava-1.5-7b, blip2-opt-2.7b, ...).")],
    source: Annotated[str, typer.Option(help="Where from: huggingface (HF_ENDPOINT, HF_TOKEN) or modelscope.")] = (
        "huggingface"
    ),
    revision: Annotated[str | None, typer.Option(help="Branch, tag or commit (default: the main branch).")] = None,
) -> None:
    """Download a checkpoint into $VLCHAT_HOME/models (resumable; files verified) for --model org/repo.
    Prints the model folder. With HF_HUB_OFFLINE=1 nothing is fetched: the Hugging Face cache is used."""
    from vlchat.pull import pull as run_pull

    print(run_pull(name, source, revision))


weights_app = typer.Typer(no_args_is_help=True, help="Prepare released weights (apply a delta to its base model).")
app.add_typer(weights_app, name="weights")
DirOption = Annotated[Path, typer.Option(help="The base model directory (e.g. LLaMA in Hugging Face format).")]


@weights_app.command("apply-delta")
def weights_apply_delta(
    base: DirOption,
    delta: Annotated[Path, typer.Option(help="The delta directory (e.g. Vicuna v0's); its tokenizer is kept.")],
    out: Annotated[Path, typer.Option(help="A new (or empty) directory for the result.")],
    embeddings: Annotated[
        str, typer.Option(help="add: base added to the delta's first rows (Vicuna); delta: the delta's (Ziya-LLaMA).")
    ] = "add",
) -> None:
    """Rebuild a model released as a delta (Vicuna v0, Ziya-LLaMA): base + delta per tensor, as FastChat's
    apply_delta (the delta's extra vocabulary rows kept). Prints the output folder."""
    from vlchat.delta import apply_delta

    print(apply_delta(base, delta, out, embeddings))


@app.command("export")
def export(
    out: Annotated[Path, typer.Argument(help="The folder to write.")],
    run: Annotated[Path, typer.Option(help="A finished training run: its output_dir (e.g. runs/stage2).")],
    export_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="hf-llava: a LlavaForConditionalGeneration checkpoint (CLIP/SigLIP runs); "
            "weights: the projector (+ LoRA) in bfloat16, as vlchat/weights ships them.",
        ),
    ] = "hf-llava",
) -> None:
    """Export a training run: to the Hugging Face LLaVA layout, or as bfloat16 weights for vlchat."""
    if export_format == "hf-llava":
        from vlchat.train.export_llava import export_llava

        print(export_llava(run, out))
    elif export_format == "weights":
        from vlchat.train.export import export_run

        for path in export_run(run, out):
            print(path)
    else:
        raise VlchatError(f"--format must be hf-llava or weights, got {export_format!r}")


train_app = typer.Typer(no_args_is_help=True, help="Train the projector: stage1 (alignment), stage2 (instructions).")
data_app = typer.Typer(no_args_is_help=True, help="Inspect training data.")
app.add_typer(train_app, name="train")
app.add_typer(data_app, name="data")
Config = Annotated[Path, typer.Option("--config", "-c", help="A YAML recipe, e.g. configs/train/stage1.yaml.")]
Overrides = Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. max_steps=10 data.0.samples=64")]
Resume = Annotated[bool, typer.Option(help="Continue from the newest checkpoint in output_dir.")]


@train_app.command("stage1")
def train_stage1(config: Config, overrides: Overrides = None, resume: Resume = False) -> None:
    """Stage 1: align the projector on image-caption pairs (encoder and LM frozen)."""
    from vlchat.train.stage1 import run

    print(f"done: {run(config, overrides or [], resume)}")


@train_app.command("stage2")
def train_stage2(config: Config, overrides: Overrides = None, resume: Resume = False) -> None:
    """Stage 2: instruction-tune on conversations (projector; optionally LoRA on the LM)."""
    from vlchat.train.stage2 import run

    print(f"done: {run(config, overrides or [], resume)}")


@data_app.command("check")
def data_check(
    spec: Annotated[
        str,
        typer.Argument(
            help="A dataset path (.json LLaVA, .jsonl, .tar shards, a cc_sbu_align folder) or easy_vqa:train."
        ),
    ],
    max_tokens: Annotated[int, typer.Option(help="Refuse samples longer than this.")] = 512,
    template: Template = None,
    model: Model = "default",
) -> None:
    """Validate a dataset before training: every problem with its file and line, not just the first."""
    from vlchat.chat.template_lookup import get_template
    from vlchat.train.datacheck import check_dataset

    config = model_config(model)
    tokenizer = load_tokenizer(config)
    problems = check_dataset(
        spec, tokenizer, max_tokens, get_template(template or config.template), config.vision.num_tokens
    )
    for problem in problems:
        print(problem)
    if problems:
        raise VlchatError(f"{len(problems)} problem(s) in {spec}")
    print(f"{spec}: no problems")


def load_tokenizer(config):
    """Just the tokenizer of a model's LM (no weights loaded)."""
    from transformers import AutoTokenizer

    from vlchat.assets import lm_directory

    tokenizer = AutoTokenizer.from_pretrained(lm_directory(config.lm.source, config.lm.sha256))
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        app()
    except VlchatError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
