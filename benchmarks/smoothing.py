"""Measure the steady per-camera state on replayed FER2013 faces: false changes and the delay of real ones.

    python benchmarks/smoothing.py --data FER2013/val [--weights W] [--tta T] [--runs N] [--json FILE]
    python benchmarks/smoothing.py --data FER2013/val --sweep     # the defaults' trade-offs

Every face of ``--data`` (class folders of 48x48 grey crops) is classified once
with the worker's classifier (the bundled model unless ``--weights``). The scores
are then replayed through ``worker.state.StateTracker`` at ``--fps`` frames per
second of simulated time, so a run of minutes takes milliseconds:

- a *steady person* is ``--minutes`` of distinct faces of one class in a row
  (each face once before any repeats). Real video of one person is far less
  noisy, so this is a hard case. Reported: state changes per minute after the
  first state, per class, over ``--runs`` runs each.
- a *change* is ``--change-s`` seconds of one class, then as long of another,
  for every ordered pair of classes. Reported: the delay from the switch until
  the state shows the new class, and how often it never does.

The goals are no change over 10 minutes for the well-recognised classes (happy,
surprise, neutral, angry) and a delay of at most 2 s between them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.classify import Classifier  # noqa: E402
from worker.config import ModelSettings, StateSettings  # noqa: E402
from worker.log import setup_logging  # noqa: E402
from worker.state import StateTracker  # noqa: E402

WELL = ("happy", "surprise", "neutral", "angry")
GOAL_DELAY_S = 2.0
BOX = [0, 0, 48, 48]


def classify(data: Path, model: ModelSettings, cache: Path | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Scores (N, classes) of every image of each class folder of ``data``, in file name order, and the model.

    With ``cache``, scores saved there by an earlier run with the same model, TTA and data are reused.
    """
    clf = Classifier(model)
    meta = {"name": clf.info.name, "version": clf.info.version, "tta": clf.tta, "classes": list(clf.info.classes)}
    meta |= {"device": str(clf.device), "precision": clf.precision}
    key = json.dumps({**meta, "path": str(clf.path), "data": str(data.resolve())}, sort_keys=True)
    if cache is not None and cache.is_file():
        with np.load(cache) as saved:
            if str(saved["key"]) == key:
                return {c: saved[c] for c in clf.info.classes if c in saved}, {**meta, "cached": True}
    scores = {}
    for c in clf.info.classes:
        paths = sorted((data / c).glob("*.jpg")) + sorted((data / c).glob("*.png"))
        if not paths:
            continue
        crops = np.stack([cv2.resize(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE), (48, 48)) for p in paths])
        scores[c] = np.concatenate([clf.predict(crops[i : i + 256]).numpy() for i in range(0, len(crops), 256)])
    if not scores:
        raise SystemExit(f"no class folders with images in {data}")
    if cache is not None:
        np.savez(cache, key=np.array(key), **scores)
    return scores, meta


def faces_of(scores: np.ndarray, n: int, rng: random.Random):
    """``n`` face records drawn from ``scores`` (rows), each row once before any repeats."""
    out: list[int] = []
    while len(out) < n:
        order = list(range(len(scores)))
        rng.shuffle(order)
        out += order
    return out[:n]


def replay(tracker: StateTracker, seq: list[dict], fps: float, jitter: float, rng: random.Random) -> list[dict]:
    """Feed one camera's frames (score dicts) at ``fps``; the change records, each with its time ``t``."""
    changes = []
    tracker.add_listener(lambda state, change, now: change and changes.append({**change, "t": now}))
    for i, scores in enumerate(seq):
        t = (i + rng.uniform(-jitter, jitter)) / fps if i else 0.0
        tracker.observe("cam", [{"box": BOX, "scores": scores}], now=t)
    return changes


def as_dicts(rows: np.ndarray, classes: tuple[str, ...]) -> list[dict]:
    return [dict(zip(classes, map(float, r))) for r in rows]


def measure(scores: dict[str, list[dict]], classes, settings: StateSettings, args, rng_seed: int, pairs=None) -> dict:
    """Steady-run change rates per class and change delays per ordered pair, for one setting."""
    steady, delays = {}, {}
    n = round(args.minutes * 60 * args.fps)
    for c, rows in scores.items():
        changes = 0
        for run in range(args.runs):
            rng = random.Random(f"{rng_seed}-steady-{c}-{run}")
            seq = [rows[i] for i in faces_of(rows, n, rng)]
            tracker = StateTracker(settings, classes, {"name": "bench", "version": "0"})
            got = replay(tracker, seq, args.fps, args.jitter, rng)
            changes += max(0, len(got) - 1)  # the first is none -> the first emotion
        steady[c] = {"changes": changes, "minutes": args.minutes * args.runs}
        steady[c]["per_min"] = changes / steady[c]["minutes"]
    half = round(args.change_s * args.fps)
    for a, b in pairs or itertools.permutations(scores, 2):
        got_delays, missed = [], 0
        for run in range(args.runs):
            rng = random.Random(f"{rng_seed}-change-{a}-{b}-{run}")
            seq = [scores[a][i] for i in faces_of(scores[a], half, rng)]
            seq += [scores[b][i] for i in faces_of(scores[b], half, rng)]
            tracker = StateTracker(settings, classes, {"name": "bench", "version": "0"})
            switch = half / args.fps
            got = [ch for ch in replay(tracker, seq, args.fps, args.jitter, rng) if ch["t"] >= switch - 1e-9]
            shown = next((ch["t"] - switch for ch in got if ch["to"] == b), None)
            if shown is None:
                missed += 1
            else:
                got_delays.append(shown)
        delays[f"{a}->{b}"] = {
            "runs": args.runs,
            "missed": missed,
            "median_s": statistics.median(got_delays) if got_delays else None,
            "max_s": max(got_delays) if got_delays else None,
            "delays_s": [round(x, 3) for x in got_delays],
        }
    return {"steady": steady, "changes": delays}


def summary(result: dict, classes) -> dict:
    """The figures the goals speak of: changes of the well-recognised classes, delays between them."""
    well = [c for c in WELL if c in result["steady"]]
    pairs = [v for k, v in result["changes"].items() if all(x in well for x in k.split("->"))]
    delays = sorted(d for v in pairs for d in v["delays_s"])
    return {
        "well_changes": sum(result["steady"][c]["changes"] for c in well),
        "well_minutes": sum(result["steady"][c]["minutes"] for c in well),
        "well_max_per_min": max((result["steady"][c]["per_min"] for c in well), default=0.0),
        "all_per_min": statistics.mean(v["per_min"] for v in result["steady"].values()),
        "well_delay_median_s": statistics.median(delays) if delays else None,
        "well_delay_p90_s": delays[min(len(delays) - 1, int(0.9 * len(delays)))] if delays else None,
        "well_delay_max_s": delays[-1] if delays else None,
        "well_delay_within_goal": sum(d <= GOAL_DELAY_S + 1e-9 for d in delays) / len(delays) if delays else None,
        "well_missed": sum(v["missed"] for v in pairs),
    }


def fmt(x, unit="") -> str:
    return "-" if x is None else f"{x:.2f}{unit}"


def print_report(result: dict, settings: StateSettings, accuracy: dict, args) -> None:
    print(
        f"state: time_constant_s {settings.time_constant_s}, min_confidence {settings.min_confidence}, "
        f"margin {settings.margin}, hold_s {settings.hold_s}; {args.fps:g} frames/s, jitter {args.jitter:g}"
    )
    print(f"steady runs: {args.runs} x {args.minutes:g} min of distinct faces per class")
    print(f"{'class':<10}{'faces':>7}{'top-1':>8}{'changes':>9}{'per min':>9}")
    for c, v in result["steady"].items():
        n, acc = accuracy[c]
        mark = "  (well recognised)" if c in WELL else ""
        print(f"{c:<10}{n:>7}{acc:>8.1%}{v['changes']:>9}{v['per_min']:>9.3f}{mark}")
    print(f"changes: {args.change_s:g} s of one class, then another; delay until the state shows it")
    print(f"{'from -> to':<22}{'median':>8}{'max':>8}{'missed':>8}")
    for k, v in result["changes"].items():
        print(f"{k:<22}{fmt(v['median_s'], ' s'):>8}{fmt(v['max_s'], ' s'):>8}{v['missed']:>5}/{v['runs']}")
    s = result["summary"]
    print(
        f"well recognised: {s['well_changes']} changes in {s['well_minutes']:g} min of steady faces (goal 0); "
        f"delay median {fmt(s['well_delay_median_s'], ' s')}, p90 {fmt(s['well_delay_p90_s'], ' s')}, "
        f"max {fmt(s['well_delay_max_s'], ' s')}, {fmt(100 * (s['well_delay_within_goal'] or 0), '%')} "
        f"within {GOAL_DELAY_S:g} s (goal), missed {s['well_missed']}"
    )


def sweep(scores, classes, base: StateSettings, args) -> list[dict]:
    """The goal figures over a grid of settings, fewest false changes first, then the shortest delay."""
    well = [c for c in WELL if c in scores]
    pairs = list(itertools.permutations(well, 2))
    rows = []
    grid = itertools.product(args.grid_time_constant, args.grid_min_confidence, args.grid_margin, args.grid_hold)
    for tau, conf, margin, hold in grid:
        s = base.model_copy(update={"time_constant_s": tau, "min_confidence": conf, "margin": margin, "hold_s": hold})
        sub = {c: scores[c] for c in well}
        result = measure(sub, classes, s, args, args.seed, pairs)
        rows.append(
            {"time_constant_s": tau, "min_confidence": conf, "margin": margin, "hold_s": hold}
            | summary(result, classes)
        )
    rows.sort(key=lambda r: (r["well_changes"], r["well_missed"], r["well_delay_max_s"] or 1e9))
    print(
        f"{'tau':>6}{'conf':>6}{'margin':>7}{'hold':>6}{'changes':>9}{'delay med':>11}{'p90':>9}{'max':>9}{'missed':>8}"
    )
    for r in rows:
        print(
            f"{r['time_constant_s']:>6g}{r['min_confidence']:>6g}{r['margin']:>7g}{r['hold_s']:>6g}"
            f"{r['well_changes']:>9}{fmt(r['well_delay_median_s'], ' s'):>11}{fmt(r['well_delay_p90_s'], ' s'):>9}"
            f"{fmt(r['well_delay_max_s'], ' s'):>9}{r['well_missed']:>8}"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    d = StateSettings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="class folders of face crops, e.g. FER2013's val/")
    p.add_argument("--weights", type=Path, help="checkpoint (default: the bundled model)")
    p.add_argument("--tta", choices=["auto", "none", "flip", "tencrop", "rotate"], default=ModelSettings().tta)
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--fps", type=float, default=5.0, help="frames per second of simulated time (default 5)")
    p.add_argument("--jitter", type=float, default=0.0, help="random shift of each frame, in frame periods")
    p.add_argument("--minutes", type=float, default=10.0, help="length of each steady run (default 10)")
    p.add_argument("--runs", type=int, default=5, help="runs per class and per pair, each with its own faces")
    p.add_argument("--change-s", type=float, default=30.0, help="seconds of each class in a change run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-constant-s", type=float, default=d.time_constant_s)
    p.add_argument("--min-confidence", type=float, default=d.min_confidence)
    p.add_argument("--margin", type=float, default=d.margin)
    p.add_argument("--hold-s", type=float, default=d.hold_s)
    p.add_argument("--sweep", action="store_true", help="measure a grid of settings (well-recognised classes only)")
    p.add_argument("--grid-time-constant", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0])
    p.add_argument("--grid-min-confidence", type=float, nargs="+", default=[0.3, 0.4, 0.5])
    p.add_argument("--grid-margin", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--grid-hold", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    p.add_argument("--cache", type=Path, help="keep the scores in this .npz; a rerun with the same model reuses them")
    p.add_argument("--json", type=Path, help="also write the figures as JSON to this file ('-': standard output)")
    args = p.parse_args(argv)
    setup_logging("warning")  # no line per simulated change

    t0 = time.perf_counter()
    raw, meta = classify(args.data, ModelSettings(weights=args.weights, tta=args.tta, device=args.device), args.cache)
    classes = tuple(meta["classes"])
    accuracy = {c: (len(r), float((r.argmax(1) == classes.index(c)).mean())) for c, r in raw.items()}
    scores = {c: as_dicts(r, classes) for c, r in raw.items()}
    how = f"read from {args.cache}" if meta.get("cached") else f"classified in {time.perf_counter() - t0:.1f} s"
    print(
        f"model {meta['name']} {meta['version']}, tta {meta['tta']}: {sum(len(r) for r in raw.values())} faces "
        f"of {args.data} {how}"
    )
    doc: dict = {
        "model": {k: meta[k] for k in ("name", "version", "tta")},
        "data": str(args.data),
        "fps": args.fps,
        "jitter": args.jitter,
        "runs": args.runs,
        "minutes": args.minutes,
        "change_s": args.change_s,
        "accuracy": {c: acc for c, (_, acc) in accuracy.items()},
    }
    if args.sweep:
        doc["sweep"] = sweep(scores, classes, d, args)
    else:
        settings = d.model_copy(
            update={
                "time_constant_s": args.time_constant_s,
                "min_confidence": args.min_confidence,
                "margin": args.margin,
                "hold_s": args.hold_s,
            }
        )
        result = measure(scores, classes, settings, args, args.seed)
        result["summary"] = summary(result, classes)
        print_report(result, settings, accuracy, args)
        doc["state"] = settings.model_dump()
        doc |= result
    if args.json:
        text = json.dumps(doc, indent=1)
        if str(args.json) == "-":
            print(text)
        else:
            args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
