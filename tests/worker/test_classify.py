"""Batched inference: probabilities, test-time augmentation, the Classifier's set-up checks."""

from __future__ import annotations

import math

import pytest
import torch

import worker.model
from worker.classify import ROTATE_DEG, TTA_MODES, Classifier, autocast_dtype, plan, predict, rotate, tta_views
from worker.config import ModelSettings
from worker.model import CheckpointError, load_checkpoint, load_onnx


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    """Five uint8 grey 48x48 crops with structure (not flat), so the network's outputs differ."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (5, 48, 48), dtype=torch.uint8, generator=g)


def symmetric(n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    half = torch.randint(0, 256, (n, 48, 24), dtype=torch.uint8, generator=g)
    return torch.cat([half, half.flip(-1)], dim=-1)


def classifier(path, **kw) -> Classifier:
    return Classifier(ModelSettings(weights=path, **({"device": "cpu", "precision": "fp32", "tta": "flip"} | kw)))


# --- predict ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tta", TTA_MODES)
def test_predict_gives_probabilities(tiny, crops, tta):
    model, info = tiny
    probs = predict(model, info, crops, tta=tta)
    assert probs.shape == (5, 7) and probs.dtype == torch.float32 and probs.device.type == "cpu"
    assert (probs >= 0).all() and (probs <= 1).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(5))
    assert not torch.allclose(probs[0], probs[1])  # each crop gets its own answer


def test_predict_matches_a_manual_forward_pass(tiny, crops):
    model, info = tiny
    x = (crops.unsqueeze(1).float() / 255 - info.mean) / info.std
    with torch.no_grad():
        expected = model(x).softmax(1)
    torch.testing.assert_close(predict(model, info, crops), expected, rtol=1e-5, atol=1e-6)


def test_predict_accepts_a_channel_dimension(tiny, crops):
    model, info = tiny
    torch.testing.assert_close(predict(model, info, crops.unsqueeze(1)), predict(model, info, crops))


@pytest.mark.parametrize("tta", TTA_MODES)
def test_batches_give_the_same_answer_as_one_batch(tiny, crops, tta):
    model, info = tiny
    torch.testing.assert_close(
        predict(model, info, crops, tta=tta, batch_size=2),
        predict(model, info, crops, tta=tta, batch_size=128),
        rtol=1e-5,
        atol=1e-6,
    )


def test_predict_of_nothing(tiny):
    model, info = tiny
    assert predict(model, info, torch.zeros(0, 48, 48, dtype=torch.uint8)).shape == (0, 7)


def test_predict_does_not_change_its_input(tiny):
    model, info = tiny
    x = torch.full((2, 1, 48, 48), 100.0)
    predict(model, info, x)
    assert (x == 100.0).all()


def test_flip_of_a_symmetric_input_equals_no_tta(tiny):
    model, info = tiny
    x = symmetric()
    torch.testing.assert_close(
        predict(model, info, x, tta="flip"), predict(model, info, x, tta="none"), rtol=1e-5, atol=1e-6
    )


def test_flip_of_an_asymmetric_input_averages_both_views(tiny, crops):
    model, info = tiny
    plain, mirrored = predict(model, info, crops), predict(model, info, crops.flip(-1))
    assert not torch.allclose(plain, mirrored, atol=1e-4)
    torch.testing.assert_close(predict(model, info, crops, tta="flip"), (plain + mirrored) / 2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["tencrop", "rotate"])
def test_shifts_and_turns_of_a_flat_input_equal_no_tta(tiny, mode):
    model, info = tiny
    x = torch.full((2, 48, 48), 140, dtype=torch.uint8)
    torch.testing.assert_close(
        predict(model, info, x, tta=mode), predict(model, info, x, tta="none"), rtol=1e-5, atol=1e-5
    )


def test_rotate_averages_the_six_views(tiny, crops):
    model, info = tiny
    x = (crops.unsqueeze(1).float().div(255) - info.mean) / info.std
    with torch.inference_mode():
        expected = torch.stack([model(v).softmax(1) for v in tta_views(x, "rotate")]).mean(0)
    torch.testing.assert_close(predict(model, info, crops, tta="rotate"), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(expected, predict(model, info, crops, tta="flip"), atol=1e-4)


def test_unknown_tta(tiny, crops):
    model, info = tiny
    with pytest.raises(ValueError, match="unknown test-time augmentation 'mirror'"):
        predict(model, info, crops, tta="mirror")


# --- tta_views ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, count", [("none", 1), ("flip", 2), ("tencrop", 10), ("rotate", 6)])
def test_tta_views_count_and_shape(mode, count):
    x = torch.randn(3, 1, 48, 48)
    views = tta_views(x, mode)
    assert len(views) == count
    assert all(v.shape == (3, 1, 48, 48) for v in views)
    assert torch.equal(views[0], x)


def test_flip_view_is_the_mirror():
    x = torch.randn(2, 1, 48, 48)
    assert torch.equal(tta_views(x, "flip")[1][..., :, 0], x[..., :, -1])
    assert torch.equal(tta_views(x, "flip")[1], x.flip(-1))


def test_tencrop_views_are_shifts_and_their_mirrors():
    x = torch.arange(48 * 48, dtype=torch.float32).reshape(1, 1, 48, 48)
    views = tta_views(x, "tencrop")
    assert len({tuple(v.flatten().tolist()) for v in views}) == 10  # all different
    # views 1..4: 2-pixel shifts in both directions, e.g. the top-left one shows x moved right and down by 2
    shifted = views[1]
    assert torch.equal(shifted[..., 2:, 2:], x[..., :-2, :-2])
    assert torch.equal(views[4][..., :-2, :-2], x[..., 2:, 2:])
    for plain, mirror in zip(views[:5], views[5:]):
        assert torch.equal(mirror, plain.flip(-1))


def test_rotate_views_are_turns_and_their_mirrors():
    x = torch.randn(2, 1, 48, 48)
    views = tta_views(x, "rotate")
    torch.testing.assert_close(views[1], rotate(x, -ROTATE_DEG))
    torch.testing.assert_close(views[2], rotate(x, ROTATE_DEG))
    for plain, mirror in zip(views[:3], views[3:]):
        assert torch.equal(mirror, plain.flip(-1))
    # A blob centred on the image is unchanged by a turn about that centre; an asymmetric image is not.
    grid = torch.arange(48.0) - 23.5
    blob = torch.exp(-(grid.view(-1, 1) ** 2 + grid.view(1, -1) ** 2) / 50).expand(1, 1, 48, 48)
    torch.testing.assert_close(rotate(blob, ROTATE_DEG), blob, atol=0.01, rtol=0)
    assert (views[1] - x).abs().mean() > 0.1


def test_rotate_turns_counter_clockwise_on_screen():
    x = torch.zeros(1, 1, 48, 48)
    x[..., 24, 40] = 1  # right of the centre (23.5, 23.5)
    row, col = divmod(rotate(x, 90).flatten().argmax().item(), 48)
    assert (row, col) == (7, 24)  # above it
    row, col = divmod(rotate(x, -90).flatten().argmax().item(), 48)
    assert (row, col) == (40, 23)  # below it
    # By ROTATE_DEG (8), the dot moves up by about 16.5 * sin(8 degrees) = 2.3 pixels.
    turned = rotate(x, ROTATE_DEG)[0, 0]
    rows = torch.arange(48.0)
    centre_row = (turned.sum(1) * rows).sum() / turned.sum()
    assert centre_row == pytest.approx(24 - 16.5 * math.sin(math.radians(ROTATE_DEG)), abs=0.3)
    assert torch.equal(rotate(x, 0), x)


def test_tta_views_unknown_mode():
    with pytest.raises(ValueError, match="none, flip, tencrop, rotate"):
        tta_views(torch.zeros(1, 1, 48, 48), "five")


# --- Classifier -------------------------------------------------------------------------------------


def test_classifier_predicts_numpy_and_tensors(tiny_checkpoint, tiny, crops):
    clf = classifier(tiny_checkpoint)
    assert clf.path == tiny_checkpoint and clf.tta == "flip" and clf.precision == "fp32"
    assert clf.info.name == "tiny-test" and clf.device.type == "cpu"
    from_numpy = clf.predict(crops.numpy())
    from_tensor = clf.predict(crops)
    assert from_numpy.shape == (5, 7)
    torch.testing.assert_close(from_numpy, from_tensor)
    torch.testing.assert_close(from_numpy.sum(1), torch.ones(5))
    model, info = tiny  # the same answer as the plain function with the same settings
    torch.testing.assert_close(from_numpy, predict(model, info, crops, tta="flip"), rtol=1e-5, atol=1e-6)


def test_classifier_bf16_is_close_to_fp32(tiny_checkpoint, crops):
    fp32 = classifier(tiny_checkpoint, precision="fp32").predict(crops)
    bf16 = classifier(tiny_checkpoint, precision="bf16")
    assert bf16.precision == "bf16"
    probs = bf16.predict(crops)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(1), torch.ones(5))
    torch.testing.assert_close(probs, fp32, rtol=0, atol=0.05)


@pytest.mark.parametrize(("has_bf16", "expected"), [(True, "bf16"), (False, "fp32")])
def test_classifier_auto_precision_follows_the_cpu(tiny_checkpoint, monkeypatch, has_bf16, expected):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: has_bf16)
    assert autocast_dtype(torch.device("cpu")) == (torch.bfloat16 if has_bf16 else None)
    assert classifier(tiny_checkpoint, precision="auto").precision == expected


def test_classifier_with_missing_weights(tmp_path):
    missing = tmp_path / "gone.safetensors"
    with pytest.raises(CheckpointError) as info:
        classifier(missing)
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)


@pytest.mark.parametrize("weights", [None, "auto", "resnet9-small", "resnet9"])
def test_classifier_without_the_bundled_model(tmp_path, monkeypatch, weights):
    missing = {"resnet9": tmp_path / "a.safetensors", "resnet9-small": tmp_path / "b.safetensors"}
    monkeypatch.setattr(worker.model, "BUNDLED", missing)
    with pytest.raises(CheckpointError) as info:
        Classifier(ModelSettings(device="cpu", weights=weights))
    message = str(info.value)
    name = "resnet9" if weights == "resnet9" else "resnet9-small"  # auto on a CPU is the small model
    assert f"bundled model '{name}' is missing" in message and str(missing[name]) in message
    assert "model.weights" in message


def test_fp16_on_cpu_is_refused(tiny_checkpoint):
    with pytest.raises(ValueError) as info:
        classifier(tiny_checkpoint, precision="fp16")
    message = str(info.value)
    assert "model.precision 'fp16'" in message and "CUDA" in message and "bf16" in message


def test_cuda_without_a_cuda_device(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CheckpointError, match="model.device is 'cuda'"):
        classifier(tiny_checkpoint, device="cuda")


def test_autocast_dtype_elsewhere():
    assert autocast_dtype(torch.device("meta")) is None


# --- plan: what "auto" picks ----------------------------------------------------------------------


@pytest.fixture
def bundled(tiny_onnx, monkeypatch):
    """Bundled models by name: the tiny checkpoint (with its int8 ONNX beside it) stands in for both."""
    monkeypatch.setattr(
        worker.model, "BUNDLED", {"resnet9": tiny_onnx["checkpoint"], "resnet9-small": tiny_onnx["checkpoint"]}
    )
    return tiny_onnx


def picked(settings: ModelSettings, cuda: bool = False, bf16: bool = True) -> tuple:
    p = plan(settings, cuda=cuda, bf16=bf16)
    return p.weights.name, p.backend, p.device.type, p.amp, p.tta


def test_auto_serves_the_small_model_on_a_cpu_and_the_full_one_on_cuda(monkeypatch, tmp_path):
    files = {"resnet9": tmp_path / "full.safetensors", "resnet9-small": tmp_path / "small.safetensors"}
    for f in files.values():
        f.touch()
    monkeypatch.setattr(worker.model, "BUNDLED", files)
    cpu = plan(ModelSettings(), cuda=False, bf16=True)
    assert (cpu.weights, cpu.backend, cpu.device.type, cpu.amp) == (
        files["resnet9-small"],
        "torch",
        "cpu",
        torch.bfloat16,
    )
    assert "small model" in cpu.why[0] and "resnet9" in cpu.why[0]  # says how to take the full model back
    gpu = plan(ModelSettings(), cuda=True, bf16=True)
    assert (gpu.weights, gpu.backend, gpu.device.type) == (files["resnet9"], "torch", "cuda")
    assert gpu.amp in (torch.bfloat16, torch.float16)
    assert plan(ModelSettings(weights="resnet9"), cuda=False).weights == files["resnet9"]
    assert plan(ModelSettings(weights=None), cuda=False).weights == files["resnet9-small"]


def test_auto_tta_is_flip_on_cuda_and_none_on_a_cpu_and_a_set_one_is_kept(monkeypatch, tmp_path):
    files = {"resnet9": tmp_path / "full.safetensors", "resnet9-small": tmp_path / "small.safetensors"}
    for f in files.values():
        f.touch()
    monkeypatch.setattr(worker.model, "BUNDLED", files)
    cpu, gpu = plan(ModelSettings(), cuda=False), plan(ModelSettings(), cuda=True)
    assert (cpu.tta, gpu.tta) == ("none", "flip")
    assert any("model.tta = 'flip'" in line for line in cpu.why)  # says how to take TTA back
    assert plan(ModelSettings(tta="flip"), cuda=False).tta == "flip"
    assert plan(ModelSettings(tta="none"), cuda=True).tta == "none"


def test_auto_backend_is_int8_onnxruntime_on_a_cpu_without_bf16(bundled):
    ckpt = bundled["checkpoint"]
    assert picked(ModelSettings(weights=ckpt), bf16=True) == (ckpt.name, "torch", "cpu", torch.bfloat16, "none")
    assert picked(ModelSettings(weights=ckpt), bf16=False) == ("tiny.int8.onnx", "onnxruntime", "cpu", None, "none")
    p = plan(ModelSettings(weights="resnet9-small", tta="none"), bf16=False)
    assert (p.weights, p.backend, p.tta) == (bundled["int8"], "onnxruntime", "none")
    assert any("lacks bf16" in why for why in p.why)
    # An explicit precision is PyTorch's: the user asked for that arithmetic.
    assert picked(ModelSettings(weights=ckpt, precision="fp32"), bf16=False)[:4] == (ckpt.name, "torch", "cpu", None)
    # On CUDA the ONNX file beside the checkpoint is not used.
    assert picked(ModelSettings(weights=ckpt), cuda=True, bf16=False)[1:3] == ("torch", "cuda")


def test_auto_backend_without_an_int8_file_is_pytorch_fp32(tiny_checkpoint):
    p = plan(ModelSettings(weights=tiny_checkpoint), bf16=False)
    assert (p.weights, p.backend, p.amp) == (tiny_checkpoint, "torch", None)
    assert "tiny.int8.onnx" in p.why[0] and "fp32" in p.why[0]


def test_an_onnx_file_runs_on_onnxruntime(bundled):
    p = plan(ModelSettings(weights=bundled["fp32"]), cuda=True)
    assert (p.weights, p.backend, p.device.type) == (bundled["fp32"], "onnxruntime", "cpu")
    assert picked(ModelSettings(weights=bundled["checkpoint"], backend="onnxruntime"))[:2] == (
        "tiny.int8.onnx",
        "onnxruntime",
    )


@pytest.mark.parametrize(
    "settings, cuda, error",
    [
        ({"backend": "torch", "weights": "ONNX"}, False, "model.backend 'torch' needs a safetensors checkpoint"),
        ({"backend": "onnxruntime", "device": "cuda"}, True, "model.backend 'onnxruntime' runs on the CPU"),
        ({"backend": "onnxruntime", "precision": "bf16"}, False, "model.precision 'bf16' applies to the torch"),
        ({"backend": "onnxruntime", "weights": "TINY"}, False, "there is no tiny.int8.onnx beside"),
        ({"device": "cuda"}, False, "model.device is 'cuda' but PyTorch sees no CUDA device"),
    ],
)
def test_contradictory_model_settings_are_refused(bundled, tiny_checkpoint, settings, cuda, error):
    weights = {"ONNX": bundled["int8"], "TINY": tiny_checkpoint}.get(settings.get("weights"), bundled["checkpoint"])
    with pytest.raises(ValueError) as info:
        plan(ModelSettings(**{**settings, "weights": weights}), cuda=cuda, bf16=True)
    assert error in str(info.value)
    if "no tiny.int8.onnx" in error:
        assert "emotion-train export" in str(info.value) and "--onnx --int8" in str(info.value)


# --- the ONNX Runtime backend ---------------------------------------------------------------------


@pytest.mark.parametrize("tta", TTA_MODES)
def test_fp32_onnx_gives_the_probabilities_of_pytorch(tiny_onnx, tiny, crops, tta):
    model, info = tiny
    onnx_model, onnx_info = load_onnx(tiny_onnx["fp32"])
    assert (onnx_info.classes, onnx_info.name, onnx_info.version) == (info.classes, "tiny-test", "t1")
    assert (onnx_info.mean, onnx_info.std, onnx_model.precision) == (info.mean, info.std, "fp32")
    expected = predict(model, info, crops, tta=tta)
    torch.testing.assert_close(predict(onnx_model, onnx_info, crops, tta=tta), expected, rtol=1e-4, atol=1e-5)


def test_int8_onnx_stays_close_to_fp32(tiny_onnx, crops):
    fp32, info = load_onnx(tiny_onnx["fp32"])
    int8, _ = load_onnx(tiny_onnx["int8"])
    assert int8.precision == "int8"
    x = (crops.unsqueeze(1).float() / 255 - info.mean) / info.std
    exact, quantized = fp32(x), int8(x)
    assert not torch.equal(exact, quantized)  # it does compute in int8
    assert (quantized - exact).norm() / exact.norm() < 0.1


def test_classifier_on_onnxruntime_with_flip_tta(tiny_onnx, crops):
    clf = classifier(tiny_onnx["checkpoint"], backend="onnxruntime", precision="auto", tta="flip")
    assert (clf.backend, clf.precision, clf.path, clf.device.type) == ("onnxruntime", "int8", tiny_onnx["int8"], "cpu")
    probs = clf.predict(crops.numpy())
    assert probs.shape == (5, 7) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(1), torch.ones(5))
    # Flip TTA averages a face and its mirror, so a face and its mirror get one answer.
    torch.testing.assert_close(clf.predict(crops.flip(-1)), probs, rtol=1e-4, atol=1e-5)
    int8, info = load_onnx(tiny_onnx["int8"])
    assert not torch.allclose(probs, predict(int8, info, crops, tta="none"), atol=1e-6)
