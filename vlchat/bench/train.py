"""How long a chain of training recipes takes on this machine, from a few timed steps of each:
python -m vlchat.bench.train [--steps N] [--reference DIR] CONFIG [CONFIG ...] [--set key=value ...].

Machines of the same "2-core" kind differ several-fold in speed, so a wall time measured on one
says little about another. For each recipe this builds the run as `vlchat train` does
(trainer.prepare), times its first N optimizer steps with the training loop's own step
(trainer.train_step: the same batches, in the same order, data preparation included) and
projects the whole run: set-up + N steps' mean x max_steps. With `compile: true` the first two
steps also compile the LM's layers (trainer.COMPILE_STEPS), a one-off cost, so they count once and
the mean of the later steps scales the rest. With --reference DIR holding the
metrics of real runs (`<output_dir name>-metrics.jsonl`, as reports/default-model/ does), it
also prints this machine's time for the same N steps against theirs (the ratio) and the real
run's wall time scaled by it, which accounts for batches that get longer or shorter later on.

init_projector and init_adapter are dropped (each part is timed before the one it starts from
has run): a fresh projector and LoRA adapter of the same shapes cost the same per step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from vlchat.errors import VlchatError
from vlchat.train import distributed
from vlchat.train.recipe import TrainConfig, load_config
from vlchat.train.trainer import COMPILE_STEPS, autocast_context, prepare, train_step


@dataclass(frozen=True)
class PartTiming:
    """One recipe's measured figures (seconds) and, when a reference run is known, its figures."""

    name: str
    max_steps: int
    setup_s: float
    steps_timed: int
    steps_s: float  # the first `steps_timed` steps, here
    one_off_steps: int = 0  # the first steps that also compile (counted once, not scaled)
    one_off_s: float = 0.0  # their seconds, within steps_s
    reference_steps_s: float | None = None  # the same steps in the reference run
    reference_run_s: float | None = None  # the reference run's whole loop

    @property
    def steady_step_s(self) -> float:
        """Mean seconds of a timed step past the one-off ones."""
        return (self.steps_s - self.one_off_s) / (self.steps_timed - self.one_off_steps)

    @property
    def projected_s(self) -> float:
        return self.setup_s + self.one_off_s + self.steady_step_s * (self.max_steps - self.one_off_steps)

    @property
    def ratio(self) -> float | None:
        """How many times slower than the reference run this machine ran the same steps."""
        return None if self.reference_steps_s is None else self.steps_s / self.reference_steps_s

    @property
    def scaled_reference_s(self) -> float | None:
        return None if self.ratio is None else self.setup_s + self.reference_run_s * self.ratio


def time_part(config: TrainConfig, steps: int, world: distributed.World) -> tuple[float, list[float]]:
    """(set-up seconds, seconds of each of the first `steps` optimizer steps) of one recipe."""
    config = replace(config, init_projector=None, init_adapter=None)
    began = time.perf_counter()
    samples, module, batches, optimizer, scheduler = prepare(config, world)
    setup_s = time.perf_counter() - began
    autocast = autocast_context(config, world.device)
    seconds = []
    for step in range(steps):
        began = time.perf_counter()
        train_step(step, config, world, module, module, batches, optimizer, scheduler, autocast, len(samples))
        seconds.append(time.perf_counter() - began)
    return setup_s, seconds


def one_off_steps(config: TrainConfig, steps: int) -> int:
    """How many of the timed steps pay a one-off cost: the compile, when some later step is left
    to give the steady pace."""
    return COMPILE_STEPS if config.compile and steps > COMPILE_STEPS else 0


def reference_figures(reference: Path, config: TrainConfig, steps: int) -> tuple[float | None, float | None]:
    """(elapsed at step `steps`, elapsed at the last step) in the reference run's metrics, if any.

    The metrics log every `log_every` steps (elapsed_s counts from the loop's start), so `steps`
    must be one of the logged steps to be compared."""
    path = reference / f"{Path(config.output_dir).name}-metrics.jsonl"
    if not path.exists():
        return None, None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:  # a run that logged nothing yet
        return None, None
    at_steps = [row["elapsed_s"] for row in rows if row["step"] == steps]
    if not at_steps:
        raise VlchatError(f"{path} has no row for step {steps}; use --steps {rows[0]['step']} (a logged step)")
    return at_steps[-1], rows[-1]["elapsed_s"]


def measure(paths: list[str], overrides: list[str], steps: int, reference: Path | None) -> list[PartTiming]:
    # every recipe and reference file is checked before any compute is spent
    configs = [load_config(path, overrides) for path in paths]
    references = [reference_figures(reference, c, steps) if reference else (None, None) for c in configs]
    world = distributed.setup()
    parts = []
    for path, config, (at_steps, run_s) in zip(paths, configs, references):
        setup_s, seconds = time_part(config, steps, world)
        one_off = one_off_steps(config, steps)
        parts.append(
            PartTiming(
                Path(path).name,
                config.max_steps,
                setup_s,
                steps,
                sum(seconds),
                one_off,
                sum(seconds[:one_off]),
                at_steps,
                run_s,
            )
        )
        print(format_part(parts[-1]), flush=True)
    return parts


def format_part(part: PartTiming) -> str:
    line = (
        f"{part.name}: set-up {part.setup_s:.1f} s, first {part.steps_timed} steps {part.steps_s:.1f} s "
        f"({part.steps_s / part.steps_timed:.2f} s/step"
    )
    if part.one_off_steps:
        line += (
            f"; the first {part.one_off_steps} compiling {part.one_off_s:.1f} s, then {part.steady_step_s:.2f} s/step"
        )
    line += f") -> {part.max_steps} steps ≈ {part.projected_s / 60:.1f} min"
    if part.ratio is not None:
        line += (
            f"; reference {part.reference_steps_s:.1f} s for the same steps ({part.ratio:.2f}x), "
            f"its run {part.reference_run_s / 60:.1f} min -> ≈ {part.scaled_reference_s / 60:.1f} min here"
        )
    return line


def format_total(parts: list[PartTiming]) -> str:
    line = f"total: ≈ {sum(p.projected_s for p in parts) / 60:.1f} min projected from the timed steps"
    if all(p.ratio is not None for p in parts):
        reference = sum(p.reference_run_s for p in parts) / 60
        line += (
            f", ≈ {sum(p.scaled_reference_s for p in parts) / 60:.1f} min from the reference runs "
            f"scaled ({reference:.1f} min of training loops there)"
        )
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlchat.bench.train", description=__doc__.split("\n")[0])
    parser.add_argument("configs", nargs="+", metavar="CONFIG", help="training recipes (YAML), in order")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps timed per recipe")
    parser.add_argument("--reference", type=Path, help="a folder of reference runs' <name>-metrics.jsonl")
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="recipe overrides applied to every recipe",
    )
    args = parser.parse_args(argv)
    try:
        if args.steps < 1:
            raise VlchatError("--steps must be at least 1")
        if args.reference is not None and not args.reference.is_dir():
            raise VlchatError(f"--reference {str(args.reference)!r} is not a folder")
        parts = measure(args.configs, args.overrides, args.steps, args.reference)
    except VlchatError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_total(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
