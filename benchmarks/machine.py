"""What a benchmark ran on: the CPU (as ``lscpu`` names it), its threads and flags, the libraries, the load."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path


def machine() -> dict:
    """The CPU model, cores, the flags that decide the precision (bf16, AMX, VNNI), versions and load average."""
    import onnxruntime
    import torch

    name, flags = platform.processor() or "unknown", set()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        name = fields.get("Model name", name).strip()
        flags = set(fields.get("Flags", "").split())
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "cpu": name,
        "cpus": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "avx512_vnni": "avx512_vnni" in flags or "avx_vnni" in flags,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": onnxruntime.__version__,
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def describe(m: dict) -> str:
    extras = [f for f in ("avx512_bf16", "amx_bf16", "avx512_vnni") if m[f]]
    return (
        f"{m['cpu']}, {m['cpus']} CPUs ({', '.join(extras) or 'no bf16, no VNNI'}); torch {m['torch']} "
        f"({m['torch_threads']} threads), onnxruntime {m['onnxruntime']}; load average {m['load_average_1min']}"
    )


def write_report(report: dict, dest: str | None) -> None:
    """``--json DEST``: the figures as JSON, to standard output for ``-``, else into the file ``dest``."""
    if dest == "-":
        print(json.dumps(report))
    elif dest:
        Path(dest).write_text(json.dumps(report, indent=2) + "\n")
