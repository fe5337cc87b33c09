"""The training loop shared by both stages: one CPU process, or many through torchrun (DDP).

Data order is a pure function of (seed, step): sample k of the run is index k % N of epoch
k // N's permutation, so `--resume` continues exactly where a checkpoint left off, on any
number of processes that divides the same global batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vlchat.chat.template_lookup import get_template
from vlchat.config import ProjectorConfig
from vlchat.errors import VlchatError
from vlchat.model.loaders import model_config
from vlchat.model.projector import Projector, load_projector, save_projector
from vlchat.model.vlm import VisionLanguageModel, load_model
from vlchat.train import distributed
from vlchat.train.checkpoint import save_checkpoint, trainable_state
from vlchat.train.collate import Batch, collate, encode_sample, length_groups, supervised_tokens
from vlchat.train.data import Sample
from vlchat.train.datasets import build_samples
from vlchat.train.packing import pack_shared_prefixes
from vlchat.train.probe import Probe
from vlchat.train.recipe import TrainConfig
from vlchat.train.resume import restore, resumable_state
from vlchat.train.runlog import MetricsLog, plot_loss


class TrainModule(nn.Module):
    """pixels + ids -> loss, with the frozen encoder outside autograd."""

    def __init__(self, vlm: VisionLanguageModel) -> None:
        super().__init__()
        self.vlm = vlm

    def forward(self, ids, labels, attention_mask, pixels, position_ids=None):
        images = None
        if pixels is not None:
            with torch.no_grad():
                features = self.vlm.vision(pixels)  # (n, N, 1280)
            images = self.vlm.projector(features)  # (n, N, D)
        embeds = self.vlm.embed(ids, images)  # (B, T, D)
        return self.vlm.lm.loss(embeds, attention_mask, labels, position_ids)


# With `compile: true`, the steps that also compile the LM's layers: the first traces a graph
# for its shapes, the second one with dynamic shapes that serves every step after (recipe.py).
COMPILE_STEPS = 2


def build_model(config: TrainConfig, device: torch.device) -> VisionLanguageModel:
    """The preset model with the recipe's projector to train (fresh or from `init_projector`) and LM freezing."""
    base = model_config(config.model)
    # Training starts from the preset's frozen parts only: no trained projector, no LoRA adapter.
    base = replace(base, projector=config.projector, projector_weights=None, lm=replace(base.lm, adapter=None))
    vlm = load_model(base)
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        vlm.projector = start_projector(config, base.projector)
    vlm.projector.requires_grad_(True).train()
    configure_lm(vlm, config, device)
    return vlm.to(device)


def start_projector(config: TrainConfig, projector: ProjectorConfig) -> Projector:
    """A fresh projector, or the `init_projector` weights (which must exist and fit)."""
    if config.init_projector is None:
        return Projector(projector)
    try:
        return load_projector(config.init_projector, projector)
    except FileNotFoundError:
        raise VlchatError(
            f"init_projector {config.init_projector!r} not found (expected "
            f"{config.init_projector}.safetensors and .json; run stage 1 first?)"
        ) from None


def training_attention(config: TrainConfig, device: torch.device) -> str:
    if config.attention == "auto":
        return "eager" if device.type == "cpu" else "sdpa"
    return config.attention


def configure_lm(vlm: VisionLanguageModel, config: TrainConfig, device: torch.device) -> None:
    vlm.lm.model.set_attn_implementation(training_attention(config, device))
    if config.lm == "full":
        vlm.lm.model.requires_grad_(True).train()
    elif config.lm == "lora":
        from peft import LoraConfig, PeftModel, get_peft_model

        if config.init_adapter is not None:
            check_init_adapter(config)
            vlm.lm.model = PeftModel.from_pretrained(vlm.lm.model, config.init_adapter, is_trainable=True)
        else:
            lora = LoraConfig(
                r=config.lora_r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=list(config.lora_targets),
                task_type="CAUSAL_LM",
            )
            vlm.lm.model = get_peft_model(vlm.lm.model, lora)
        vlm.lm.model.train()
    if config.compile:  # after LoRA: its layers are traced with their adapters
        vlm.lm.compile_layers()


def check_init_adapter(config: TrainConfig) -> None:
    """`init_adapter` must be a saved adapter of the recipe's shape (rank, scale, target modules):
    training on from it keeps the shape, so a recipe saying otherwise is an error, not ignored."""
    path = Path(config.init_adapter) / "adapter_config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        raise VlchatError(
            f"init_adapter {config.init_adapter!r}: no readable adapter_config.json (expected a run's lora folder)"
        ) from None
    wanted = {"r": config.lora_r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.lora_targets)}
    found = {
        "r": saved.get("r"),
        "lora_alpha": saved.get("lora_alpha"),
        "target_modules": sorted(saved.get("target_modules") or []),
    }
    if found != wanted:
        raise VlchatError(f"init_adapter {config.init_adapter!r} has {found}, the recipe asks for {wanted}")


def sample_indices(step: int, micro: int, config: TrainConfig, world: distributed.World, total: int) -> list[int]:
    """Dataset indices of this process's micro-batch `micro` of optimizer step `step`."""
    per_step = config.batch_size * world.size * config.grad_accum
    first = step * per_step + (micro * world.size + world.rank) * config.batch_size
    out = []
    for k in range(first, first + config.batch_size):
        epoch, position = divmod(k, total)
        out.append(int(epoch_permutation(config.seed, epoch, total)[position]))
    return out


_PERMUTATIONS: dict[tuple[int, int, int], torch.Tensor] = {}


def epoch_permutation(seed: int, epoch: int, total: int) -> torch.Tensor:
    key = (seed, epoch, total)
    if key not in _PERMUTATIONS:
        _PERMUTATIONS.clear()
        _PERMUTATIONS[key] = torch.randperm(total, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return _PERMUTATIONS[key]


class BatchMaker:
    def __init__(self, samples: Sequence[Sample], vlm: VisionLanguageModel, config: TrainConfig) -> None:
        self.samples, self.vlm, self.config = samples, vlm, config
        self.template = get_template(config.template or vlm.config.template)
        self.skipped = 0
        self.tokens = 0  # through the LM so far (packed rows count their shared prefix once)
        tokenizer = vlm.lm.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def encode(self, index: int):
        sample = self.samples[index]
        encoded = encode_sample(
            sample, self.template, self.config.system, self.vlm.lm.tokenize, self.vlm.tokens_per_image
        )
        if len(encoded.ids) > self.config.max_tokens:
            self.skipped += 1
            return None
        return encoded

    def __call__(self, indices: list[int]) -> list[Batch]:
        """The samples at `indices` as one or more padded batches of similar length."""
        items = [e for e in (self.encode(i) for i in indices) if e is not None]
        if not items:
            raise VlchatError("every sample of a batch is longer than max_tokens; raise max_tokens")
        if self.config.pack_shared_prefix:
            items = pack_shared_prefixes(items, self.config.pack_min_prefix, self.config.pack_max_tokens)
        self.tokens += sum(len(item.ids) for item in items)
        groups = length_groups(items, self.config.length_groups)
        return [collate(group, self.vlm.pixels, self.pad_id) for group in groups]


def lr_lambda(config: TrainConfig):
    """Linear warm-up, then cosine decay to 10% of the peak."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def prepare(config: TrainConfig, world: distributed.World):
    """A recipe's samples, model, batch maker, optimizer and schedule, ready for step 0; fails
    fast on bad data specs and pushes one sample through the whole data path before any compute."""
    samples = build_samples(config.data)
    torch.manual_seed(config.seed)
    module = TrainModule(build_model(config, world.device))
    batches = BatchMaker(samples, module.vlm, config)
    batches([0])
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    return samples, module, batches, optimizer, scheduler


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Run a recipe; returns the output directory (projector weights, metrics, loss curve)."""
    world = distributed.setup()
    out = Path(config.output_dir)
    state = resumable_state(out, config, world) if resume else None
    samples, module, batches, optimizer, scheduler = prepare(config, world)
    vlm = module.vlm
    start = restore(state, module, optimizer, scheduler, world) if state else 0
    wrapped = DistributedDataParallel(module, broadcast_buffers=False) if world.size > 1 else module
    metrics = MetricsLog(out / "metrics.jsonl", start) if world.main else None
    if world.main:
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    loop(config, world, wrapped, module, batches, optimizer, scheduler, metrics, start, len(samples), out)
    if world.main:
        finish(config, vlm, out, metrics, batches.skipped)
    distributed.barrier(world)
    distributed.teardown(world)
    return out


def backward_and_step(module, loss, optimizer, scheduler, config: TrainConfig, last_micro: bool) -> None:
    """Accumulate gradients; on the last micro-batch clip, step the optimizer and the schedule."""
    (with_gradient(module, loss) / config.grad_accum).backward()
    if last_micro:
        torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def with_gradient(module, loss: torch.Tensor) -> torch.Tensor:
    """`loss`, or for a group nothing trainable touched (text-only rows with the LM frozen: only the
    projector trains) a zero tied to every trainable parameter: backward then adds nothing (tested on
    one process; under DDP the aim is that every rank still runs a backward, not verified)."""
    if loss.requires_grad:
        return loss
    return loss + sum((p * 0).sum() for p in module.parameters() if p.requires_grad)


def loop(config, world, wrapped, module, batches, optimizer, scheduler, metrics, start, total, out) -> None:
    from tqdm import tqdm

    bar = tqdm(
        total=config.max_steps,
        initial=start,
        disable=not world.main,
        mininterval=2.0,
        dynamic_ncols=True,
        desc=config.stage,
    )
    began, seen, probing = time.perf_counter(), 0, 0.0  # probing: seconds spent in the probe
    autocast = autocast_context(config, world.device)
    probe = (
        Probe(
            module.vlm, config.probe_scenes, config.template, config.system, explained=config.explains_synthetic_yes_no
        )
        if world.main and config.probe_every
        else None
    )
    for step in range(start, config.max_steps):
        tokens = batches.tokens
        loss_sum, samples = train_step(
            step, config, world, wrapped, module, batches, optimizer, scheduler, autocast, total
        )
        seen += samples
        loss_value = distributed.mean_across(loss_sum, world)
        rate = seen / (time.perf_counter() - began - probing)  # training alone
        bar.set_postfix(loss=f"{loss_value:.3f}", samples_s=f"{rate:.1f}")
        bar.update(1)
        done = step + 1
        row = {
            "step": done,
            "loss": round(loss_value, 5),
            "lr": scheduler.get_last_lr()[0],
            "samples_per_s": round(rate, 3),
            "tokens": batches.tokens - tokens,  # this process's, through the LM (no padding)
            "elapsed_s": round(time.perf_counter() - began, 1),
        }
        if probe and done % config.probe_every == 0:
            probed = time.perf_counter()
            row |= probe(autocast) | {"probe_s": round(time.perf_counter() - probed, 1)}
            probing += time.perf_counter() - probed
        if world.main and (done % config.log_every == 0 or done == config.max_steps or "probe_s" in row):
            metrics.write(row)
        if world.main and (done % config.save_every == 0 or done == config.max_steps):
            save_checkpoint(
                out / "checkpoints",
                done,
                {
                    "step": done,
                    "trainable": trainable_state(module),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state(),
                    "config": config.to_dict(),
                    "world_size": world.size,
                },
                config.keep_checkpoints,
            )
    bar.close()


def train_step(
    step, config, world, wrapped, module, batches, optimizer, scheduler, autocast, total
) -> tuple[float, int]:
    """One optimizer step (all its micro-batches and length groups): (this rank's loss, samples seen
    across ranks). The training loop's body, also timed as it is by vlchat.bench.train."""
    loss_sum, seen = 0.0, 0
    for micro in range(config.grad_accum):
        groups = batches(sample_indices(step, micro, config, world, total))
        weights = group_weights(groups)
        for number, (batch, weight) in enumerate(zip(groups, weights)):
            last_group = number == len(groups) - 1
            with gradient_sync(wrapped, last_group):
                with autocast:
                    loss = wrapped(
                        *(
                            to_device(t, world.device)
                            for t in (
                                batch.ids,
                                batch.labels,
                                batch.attention_mask,
                                batch.pixels,
                                batch.position_ids,
                            )
                        )
                    )
                backward_and_step(
                    module,
                    loss * weight,
                    optimizer,
                    scheduler,
                    config,
                    last_group and micro == config.grad_accum - 1,
                )
            loss_sum += loss.item() * weight / config.grad_accum
            seen += batch.samples * world.size
    return loss_sum, seen


def autocast_enabled(config: TrainConfig, device: torch.device) -> bool:
    """bfloat16 autocast on GPUs (unless `autocast: off`), and on CPU when `autocast: bf16`."""
    return config.autocast == "bf16" or (config.autocast == "auto" and device.type == "cuda")


def autocast_context(config: TrainConfig, device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_enabled(config, device))


def group_weights(groups: list[Batch]) -> list[float]:
    """Each group's share of the supervised tokens: the weighted group losses sum to the batch's mean."""
    counts = [supervised_tokens(batch) for batch in groups]
    total = sum(counts)
    return [count / total for count in counts] if total else [1 / len(groups)] * len(groups)


def gradient_sync(wrapped, sync: bool):
    """DDP all-reduces on the last group's backward only, so ranks may split batches differently."""
    if sync or not isinstance(wrapped, DistributedDataParallel):
        return contextlib.nullcontext()
    return wrapped.no_sync()


def to_device(tensor, device):
    return tensor.to(device) if tensor is not None else None


def finish(config: TrainConfig, vlm: VisionLanguageModel, out: Path, metrics: MetricsLog, skipped: int) -> None:
    """Write the trained projector (and LoRA adapter), the loss curve and a summary."""
    save_projector(vlm.projector.cpu(), out / "projector")
    if config.lm == "lora":
        vlm.lm.model.save_pretrained(out / "lora")
    records = metrics.records()
    if records:
        plot_loss(records, out / "loss.png", f"{config.stage}: {Path(config.output_dir).name}")
    summary = {
        "steps": config.max_steps,
        "final_loss": records[-1]["loss"] if records else None,
        "samples_per_s": records[-1]["samples_per_s"] if records else None,
        "skipped_too_long": skipped,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
