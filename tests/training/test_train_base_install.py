"""`emotion-train` without the train extra (tqdm, onnx, onnxscript): every command runs, without a progress
bar, but `export --onnx`, which names the extra to install.

A second virtual environment with only the base package would install PyTorch again
(gigabytes), so these tests run `emotion-train` in a subprocess where those cannot be
imported: ``sys.modules[name] = None`` makes every ``import tqdm`` raise
ModuleNotFoundError and ``importlib.util.find_spec`` return None, as when the package
is not installed.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO
from tests.training.conftest import TINY_FIT

BLOCKED = ("tqdm", "onnx", "onnxscript")
RUN_WITHOUT_EXTRAS = (
    "import sys\n"
    f"sys.modules.update(dict.fromkeys({BLOCKED!r}))\n"
    "try:\n"
    "    import tqdm\n"
    "except ModuleNotFoundError:\n"
    "    pass\n"
    "else:\n"
    "    raise SystemExit('tqdm is importable: the test proves nothing')\n"
    "from training.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def emotion_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", RUN_WITHOUT_EXTRAS, *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_evaluate_runs_without_the_train_extra(small_fer, tiny_checkpoint):
    out = emotion_train(
        "evaluate", "--weights", str(tiny_checkpoint), "--data", str(small_fer), "--device", "cpu", "--json"
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["n"] == 7 * 12 and 0 <= result["accuracy"] <= 1


def test_export_runs_without_the_train_extra(best_run, tmp_path):
    out = emotion_train("export", "--run", str(best_run), "--to", str(tmp_path / "model.safetensors"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "model.safetensors").stat().st_size > 0


def test_fit_and_average_run_without_the_train_extra(small_fer, best_run, tmp_path):
    run = tmp_path / "run"
    out = emotion_train("fit", "--data", str(small_fer), "--out", str(run), "--seed", "1", *TINY_FIT)
    assert out.returncode == 0, out.stderr
    assert (run / "best.safetensors").is_file() and "epoch   1/1" in out.stdout
    weights = [str(run / "best.safetensors"), str(best_run / "best.safetensors")]  # the same network, seeds 1 and 0
    out = emotion_train("average", "--data", str(small_fer), "--out", str(tmp_path / "mean"), "--weights", *weights)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "mean" / "best.safetensors").is_file()


def test_onnx_export_names_the_extra_to_install(best_run, small_fer, tmp_path):
    out = emotion_train(
        "export", "--run", str(best_run), "--onnx", "--data", str(small_fer), "--to", str(tmp_path / "m.onnx")
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--onnx needs onnx and onnxscript" in out.stderr and "pip install 'emotion-worker[train]'" in out.stderr
    assert not (tmp_path / "m.onnx").exists()
