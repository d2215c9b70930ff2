"""Render the JSON of backends.py and pipeline.py as the Markdown tables of docs/benchmarks.md.

    python benchmarks/table.py runs/bench/backends.json runs/bench/pipeline.json [...]

Each file is recognised by its content; the tables are printed in the order of the files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def backends_table(report: dict) -> str:
    m = report["machine"]
    ref = report["reference"]
    lines = [
        f"{report['faces']} val/ faces; {m['cpu']}, {m['cpus']} CPUs; load average {m['load_average_1min']} "
        "at the start"
        + (f"; the last column against {ref['model']} {ref['backend']} {ref['precision']}, no TTA" if ref else ""),
        "",
        "| model | backend | precision | TTA | faces/s, batch 1 | faces/s, batch 64 | val/ accuracy | vs full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        ratio = f"{r['vs_reference']:.2f}x" if r.get("vs_reference") is not None else "-"
        lines.append(
            f"| {r['model']} | {r['backend']} | {r['precision']} | {r['tta']} | {r['faces_per_s_batch1']:.0f} | "
            f"{r['faces_per_s_batch64']:.0f} | {r['accuracy'] * 100:.2f}% | {ratio} |"
        )
    return "\n".join(lines)


def pipeline_tables(report: dict) -> str:
    st, m = report["stages"], report["stages"]["model"]
    settings = ", ".join(f"{k.removeprefix('EMOTION_').lower()}={v}" for k, v in report["settings"].items())
    lines = [
        f"{m['path'].rsplit('/', 1)[-1]} ({m['version']}), {m['backend']} {m['precision']}, TTA {m['tta']}"
        f" ({settings or 'the default config'}); {report['machine']['cpu']}, {report['machine']['cpus']} CPUs; "
        f"load average {report['machine']['load_average_1min']} at the start",
        "",
        "| offered | frames | processed | lost | dropped | events/s | p50 | p95 | p99 | max |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["end_to_end"]:
        offered = f"max ({r['offered_fps']:g}/s)" if r["label"] == "max" else f"{r['offered_fps']:g}/s"
        lat = [
            f"{r[f'latency_ms_{k}']:.0f} ms" if f"latency_ms_{k}" in r else "-" for k in ("p50", "p95", "p99", "max")
        ]
        lines.append(
            f"| {offered} | {r['frames']} | {r['processed']} | {r['lost']} | {r['dropped']} | "
            f"{r['events_per_s']:.1f} | " + " | ".join(lat) + " |"
        )
    lines += ["", "| stage | ms |", "|---|---|", f"| decode JPEG ({st['jpeg_bytes']} bytes) | {st['decode_ms']:.2f} |"]
    lines += [f"| Haar, detect_width {w} | {ms:.2f} |" for w, ms in st["haar_ms"].items()]
    lines += [f"| classify {n} face{'s' * (n != '1')} | {ms:.2f} |" for n, ms in st["classify_ms"].items()]
    return "\n".join(lines)


def main() -> None:
    for path in sys.argv[1:]:
        report = json.loads(Path(path).read_text())
        print(f"<!-- {path} -->")
        print(backends_table(report) if "rows" in report else pipeline_tables(report))
        print()


if __name__ == "__main__":
    main()
