"""Run hygiene: metrics as JSONL (truncated on resume), a progress bar, a loss-curve PNG (with the
probe's per-type curves when the run probed)."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [line for line in self._lines() if json.loads(line)["step"] <= resume_step]
        path.write_text("".join(f"{line}\n" for line in kept))  # no duplicates after a resume

    def _lines(self) -> list[str]:
        if not self.path.exists():
            return []
        return [line for line in self.path.read_text().splitlines() if line.strip()]

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self._lines()]


def plot_loss(records: list[dict], path: Path, title: str) -> None:
    """The training loss by step; beside it, when the run probed (train/probe.py), the held-out
    answers' exactness per question type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probed = [r for r in records if "probe_exact" in r]
    fig, axes = plt.subplots(1, 2 if probed else 1, figsize=(11 if probed else 6, 3.5), dpi=100, squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1.2)
    ax.set(xlabel="step", ylabel="training loss", title=title)
    ax.grid(alpha=0.3)
    if probed:
        ax = axes[0][1]
        for qtype in probed[-1]["probe_exact"]:
            ax.plot(
                [r["step"] for r in probed],
                [r["probe_exact"].get(qtype) for r in probed],
                lw=2.0 if qtype == "all" else 1.0,
                label=qtype,
            )
        ax.set(xlabel="step", ylabel="held-out answers exact", ylim=(-0.02, 1.02), title="probe")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
