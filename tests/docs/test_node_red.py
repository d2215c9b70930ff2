"""The Node-RED flow of docs/home-assistant.md: well formed, and its function node run on change records."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.conftest import REPO

FLOW = REPO / "docs" / "node-red-emotion-light.json"


def nodes() -> dict[str, dict]:
    return {n["id"]: n for n in json.loads(FLOW.read_text())}


def test_the_flow_is_wired_from_emotion_changes_to_a_light():
    by_id = nodes()
    assert len(by_id) == len(json.loads(FLOW.read_text())), "duplicate node ids"
    for n in by_id.values():
        for out in n.get("wires", []):
            assert all(target in by_id for target in out), n["id"]
        assert n.get("z") in (None, *by_id), n["id"]
        if n["type"] in ("mqtt in", "mqtt out"):
            assert by_id[n["broker"]]["type"] == "mqtt-broker", n["id"]
    (source,) = [n for n in by_id.values() if n["type"] == "mqtt in"]
    assert source["topic"] == "emotion/changes" and source["datatype"] == "json"
    function = by_id[source["wires"][0][0]]
    assert function["type"] == "function"
    sink = by_id[function["wires"][0][0]]
    assert sink["type"] == "mqtt out" and sink["topic"] == ""  # the function sets msg.topic


def run_function(payload) -> dict | None:
    """The function node's code, run by Node.js on ``msg.payload = payload``; returns the message it sends."""
    code = next(n for n in nodes().values() if n["type"] == "function")["func"]
    script = (
        "const node = {status: () => {}};\n"
        f"const msg = {{payload: {json.dumps(payload)}}};\n"
        f"const out = (function (msg) {{\n{code}\n}})(msg);\n"
        "process.stdout.write(JSON.stringify(out));\n"
    )
    out = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.skipif(shutil.which("node") is None, reason="runs the function node with Node.js")
def test_the_function_node_sets_a_colour_per_emotion_and_off_for_none():
    change = {"device_id": "living_room", "from": "none", "to": "happy", "confidence": 0.8, "held_s": 12.0}
    msg = run_function(change)
    assert msg["topic"] == "zigbee2mqtt/living_room_light/set"
    assert msg["payload"] == {"state": "ON", "brightness": 200, "color": {"hex": "#FFC800"}}
    colours = {
        run_function({**change, "to": e})["payload"]["color"]["hex"]
        for e in ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
    }
    assert len(colours) == 7
    assert run_function({**change, "to": "none"})["payload"] == {"state": "OFF"}
    assert run_function({**change, "device_id": "kitchen"}) is None
