"""`emotion-train` with only the base package installed: no tqdm, no matplotlib (the train extra).

A second virtual environment with only the base package would install PyTorch again
(gigabytes), so these tests run `emotion-train` in a subprocess where tqdm and matplotlib
cannot be imported: ``sys.modules[name] = None`` makes every ``import tqdm`` (and every
``import matplotlib.pyplot``) raise ModuleNotFoundError, and ``importlib.util.find_spec``
return None, exactly as when the packages are not installed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.training.conftest import TINY_FIT

BLOCKED = ("tqdm", "matplotlib")
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


@pytest.mark.parametrize("command", ["fit", "average"])
def test_training_commands_name_the_extra_to_install(command, small_fer, tiny_checkpoint, tmp_path):
    args = [*TINY_FIT] if command == "fit" else ["--weights", str(tiny_checkpoint), str(tiny_checkpoint)]
    out = emotion_train(command, "--data", str(small_fer), "--out", str(tmp_path / "run"), *args)
    assert out.returncode == 2
    assert "needs tqdm and matplotlib" in out.stderr and "pip install 'emotion-worker[train]'" in out.stderr
    assert "Traceback" not in out.stderr
