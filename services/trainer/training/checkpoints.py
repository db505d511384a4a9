"""Checkpoints on their way to and from the artifact store.

The worker writes trainer checkpoints into its work directory; the service uploads a
*snapshot* of what resuming needs, so that a job redelivered to another machine (an empty
work directory) can restore it and continue.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from services.trainer.training.worker import latest_checkpoint


def has_local_progress(work: Path) -> bool:
    """Has this machine trained (part of) this job already? Then its own files are newest."""
    if (work / "state.json").exists():
        return True
    phases = work / "phases"
    return phases.is_dir() and any(
        latest_checkpoint(p / "checkpoints") or (p / "adapter").is_dir() for p in phases.iterdir()
    )


def snapshot(work: Path, checkpoint: Path) -> Path:
    """A directory of hard links to what resuming needs: the state, the finished phases'
    adapters, the step log and this checkpoint (stable even if the trainer deletes it)."""
    snap = Path(tempfile.mkdtemp(prefix="snap-", dir=work))
    for name in ("state.json", "steps.jsonl"):  # rewritten in place: copy, not link
        if (work / name).exists():
            shutil.copy2(work / name, snap / name)
    for phase in (work / "phases").iterdir():
        if (phase / "adapter").is_dir():
            _link_tree(phase / "adapter", snap / "phases" / phase.name / "adapter")
    rel = checkpoint.relative_to(work)
    _link_tree(checkpoint, snap / rel)
    return snap


def _link(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def _link_tree(src: Path, dest: Path) -> None:
    for path in src.rglob("*"):
        if path.is_file():
            _link(path, dest / path.relative_to(src))
