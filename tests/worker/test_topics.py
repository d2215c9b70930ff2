"""Topic parsing shared by the pipeline, the MQTT link and the command line."""

from __future__ import annotations

import pytest

from worker.frames import FrameError
from worker.topics import device_id_for, frame_topic, strip_share, worker_status


def test_strip_share():
    assert strip_share("$share/group/emotion/frames/+") == "emotion/frames/+"
    assert strip_share("emotion/frames/+") == "emotion/frames/+"
    assert strip_share("$share/group") == ""


@pytest.mark.parametrize(
    ("topic", "filters", "device"),
    [
        ("emotion/frames/kitchen", ["emotion/frames/+"], "kitchen"),
        ("emotion/frames/kitchen", ["$share/g/emotion/frames/+"], "kitchen"),
        ("site/hall/camera/frames", ["emotion/frames/+", "site/+/camera/frames"], "hall"),
        ("emotion/frames/porch/extra", ["emotion/frames/#"], "porch"),
    ],
)
def test_device_id_is_the_level_of_the_first_wildcard(topic, filters, device):
    assert device_id_for(topic, filters) == device


def test_unknown_topic_and_empty_device_level_are_frame_errors():
    with pytest.raises(FrameError) as err:
        device_id_for("other/topic", ["emotion/frames/+"])
    assert err.value.reason == "unknown_topic" and "other/topic" in str(err.value)
    with pytest.raises(FrameError) as err:
        device_id_for("emotion/frames/", ["emotion/frames/+"])
    assert err.value.reason == "no_device_id"


@pytest.mark.parametrize(
    ("filters", "topic"),
    [
        (["emotion/frames/+"], "emotion/frames/desk"),
        (["$share/g/site/+/camera"], "site/desk/camera"),
        (["emotion/frames/#"], "emotion/frames/desk"),
    ],
)
def test_frame_topic_fills_in_the_device(filters, topic):
    assert frame_topic(filters, "desk") == topic
    assert device_id_for(topic, filters) == "desk"


def test_worker_status_is_below_the_status_topic():
    assert worker_status("emotion/status", "emotion-worker-nas") == "emotion/status/emotion-worker-nas"
