"""``emotion-train average``: one model whose weights are the mean of several checkpoints' weights.

Runs of one network from one starting point (``fit --init``) make a uniform "model soup" (Wortsman et al.,
ICML 2022) at the cost of one model at test time; the mean of unrelated networks is not a network.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch.optim.swa_utils import AveragedModel

from training.data import load_split
from training.export import run_checkpoint
from training.fit import METRICS_FILE, averaging, epochs_behind, finish, pick_device
from worker.classify import autocast_dtype
from worker.model import CheckpointError, load_checkpoint, read_info


def average(weights: list[Path], data: Path, out: Path, device: str = "auto") -> dict:
    """Average the checkpoints (or fit run folders) ``weights``; then, as ``fit`` does, recalibrate BatchNorm on
    ``data``'s train/, score on its val/ and write a run into ``out``. The metadata is that of the checkpoint with
    the most epochs behind it, plus ``averaged``, the inputs. Returns the metrics written.

    Raises :class:`CheckpointError` for fewer than two checkpoints, a missing one, two of different networks,
    or ``out`` the folder of one of them.
    """
    out = Path(out)
    paths = [run_checkpoint(Path(w)) for w in weights]
    if len(paths) < 2:
        raise CheckpointError(f"averaging needs two or more checkpoints, got {len(paths)}")
    if len({p.resolve() for p in paths}) < len(paths):
        raise CheckpointError("a checkpoint is given twice; give each once (the mean is unweighted)")
    if any(out.resolve() == p.parent.resolve() for p in paths):
        raise CheckpointError(f"{out}: write the average to another folder than those of its checkpoints")
    infos = [read_info(p) for p in paths]

    def network(i) -> str:
        return f"{i.shape}, classes {list(i.classes)}, input {i.input_size} px, normalisation {i.mean}/{i.std}"

    for info, path in zip(infos[1:], paths[1:]):
        if network(info) != network(infos[0]):
            raise CheckpointError(
                f"{path}: cannot be averaged with {paths[0]}: it has {network(info)}; {paths[0]} has {network(infos[0])}"
            )
    dev = pick_device(device)
    mean = None
    for path in paths:
        model, _ = load_checkpoint(path, dev)
        if mean is None:
            mean = AveragedModel(model, multi_avg_fn=averaging(None), use_buffers=True)
        mean.update_parameters(model)

    info = max(infos, key=lambda i: epochs_behind(i.extra) or 0)
    averaged = [
        {"checkpoint": str(p), "version": i.version, "epochs_behind": epochs_behind(i.extra)}
        for p, i in zip(paths, infos)
    ]
    minutes = sum(float(i.extra.get("train_minutes") or 0) for i in infos)
    extra = {**info.extra, "averaged": json.dumps(averaged), "train_minutes": f"{minutes:.1f}"}
    train, val = load_split(data, "train", info.classes), load_split(data, "val", info.classes)
    out.mkdir(parents=True, exist_ok=True)
    metrics = finish(mean.module, info, extra, train, val, out, dev, autocast_dtype(dev))
    metrics |= {"averaged": averaged, "train_seconds": round(minutes * 60, 1)}
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return metrics
