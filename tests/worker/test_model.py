"""The ResNet9 and its safetensors checkpoint format."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from worker.model import (
    CLASSES,
    ELU,
    FER_MEAN,
    FER_STD,
    CheckpointError,
    ModelInfo,
    ResNet9,
    channels,
    load_checkpoint,
    load_onnx,
    parse_stages,
    read_info,
    resolve_weights,
    save_checkpoint,
)

TINY = 0.125


def trained_like(width: float = TINY, num_classes: int = len(CLASSES), seed: int = 0) -> ResNet9:
    """A ResNet9 whose BatchNorm running statistics are not the initial ones, so they must round-trip too."""
    torch.manual_seed(seed)
    model = ResNet9(num_classes=num_classes, width=width).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(8, 1, 48, 48) * 3 + 1)
    return model.eval()


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(5, 1, 48, 48)


def load_error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    return message


# --- checkpoint round trip -----------------------------------------------------------------------


def test_save_load_round_trip_is_exact(tmp_path, batch):
    model = trained_like()
    info = ModelInfo(width=TINY, name="round-trip", version="3", extra={"val_accuracy": "0.71", "split": "fer2013"})
    path = save_checkpoint(model, info, tmp_path / "sub" / "m.safetensors")
    assert path == tmp_path / "sub" / "m.safetensors" and path.is_file()
    assert not list(path.parent.glob("*.tmp"))  # written atomically, nothing left behind

    loaded, loaded_info = load_checkpoint(path)
    assert not loaded.training  # eval mode: dropout off, BatchNorm uses running statistics
    assert loaded_info == info
    assert loaded_info.extra == {"val_accuracy": "0.71", "split": "fer2013"}
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    # Loaded in channels_last, the layout the worker runs in; in the same layout the outputs are the same bit for bit.
    assert loaded.conv2[0].weight.is_contiguous(memory_format=torch.channels_last)
    model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected, got = model(batch), loaded(batch)
        assert torch.equal(got, loaded(batch))  # deterministic in eval mode
    assert torch.equal(got, expected)


def test_read_info_reads_only_the_metadata(tmp_path):
    path = save_checkpoint(
        trained_like(), ModelInfo(width=TINY, classes=("a", "b", "c"), mean=0.4, std=0.2), tmp_path / "m.safetensors"
    )
    with pytest.raises(CheckpointError):  # 3 classes, but the network has 7 outputs
        load_checkpoint(path)
    info = read_info(path)
    assert info.classes == ("a", "b", "c") and info.mean == 0.4 and info.std == 0.2 and info.width == TINY


def test_a_saved_model_is_readable_by_other_users_under_the_usual_umask(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        path = save_checkpoint(trained_like(), ModelInfo(width=TINY), tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_metadata_round_trip():
    info = ModelInfo(classes=("x", "y"), width=0.5, mean=0.3, std=0.1, name="n", version="v", extra={"k": "v"})
    meta = info.to_metadata()
    assert meta["format"] == "emotion-resnet9" and meta["arch"] == "resnet9" and meta["input_size"] == "48"
    assert json.loads(meta["classes"]) == ["x", "y"]
    assert json.loads(meta["normalization"]) == {"mean": 0.3, "std": 0.1}
    assert ModelInfo.from_metadata(meta, "src") == info


def test_default_info_describes_fer2013():
    info = ModelInfo()
    assert info.classes == ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
    assert (info.mean, info.std, info.input_size) == (FER_MEAN, FER_STD, 48)


def test_other_class_count_round_trips(tmp_path, batch):
    model = trained_like(num_classes=3)
    path = save_checkpoint(model, ModelInfo(width=TINY, classes=("neg", "neu", "pos")), tmp_path / "m.safetensors")
    loaded, info = load_checkpoint(path)
    model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert loaded(batch).shape == (5, 3)
        assert torch.equal(loaded(batch), model(batch))


def test_fp16_checkpoint_loads_as_float32_and_is_close(tmp_path, batch):
    model = trained_like()
    info = ModelInfo(width=TINY)
    full = save_checkpoint(model, info, tmp_path / "fp32.safetensors")
    half = save_checkpoint(model, info, tmp_path / "fp16.safetensors", dtype=torch.float16)
    # Half the bytes for the weights (the header is the same size).
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded, _ = load_checkpoint(half)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert loaded.conv1[1].num_batches_tracked.dtype == torch.int64  # integer buffers are not converted
    assert loaded.conv1[1].num_batches_tracked.item() == 3
    with torch.no_grad():
        expected, got = model(batch), loaded(batch)
    assert not torch.equal(got, expected)  # it really was rounded to fp16
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)
    assert torch.equal(got.argmax(1), expected.argmax(1))


# --- refused checkpoints -----------------------------------------------------------------------------


def test_missing_file(tmp_path):
    assert "does not exist" in load_error(tmp_path / "nope.safetensors")


def test_directory(tmp_path):
    assert "is not a file" in load_error(tmp_path)


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    assert "not a readable safetensors file" in load_error(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    assert "not a readable safetensors file" in load_error(path)


class Tripwire:
    """Unpickling this creates a file: the proof that something was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_torch_save_pickle_is_refused_not_loaded(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "model.pt"
    torch.save({"state_dict": trained_like().state_dict(), "trap": Tripwire(marker)}, path)
    assert not marker.exists()
    assert "not a readable safetensors file" in load_error(path)
    assert not marker.exists()


def test_plain_pickle_is_refused_not_loaded(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps(Tripwire(marker)))
    load_error(path)
    with pytest.raises(CheckpointError):
        read_info(path)
    assert not marker.exists()


def test_safetensors_without_metadata(tmp_path):
    path = tmp_path / "bare.safetensors"
    save_file(trained_like().state_dict(), str(path))
    message = load_error(path)
    assert "not an emotion model checkpoint" in message and "'format' is None" in message


def test_safetensors_with_foreign_metadata(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    assert "'format' is 'pt'" in load_error(path)


def test_other_architecture(tmp_path):
    meta = ModelInfo(width=TINY).to_metadata() | {"arch": "vgg13"}
    path = tmp_path / "vgg.safetensors"
    save_file(trained_like().state_dict(), str(path), metadata=meta)
    assert "'vgg13' is not supported" in load_error(path)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"classes": "not json"}, "malformed"),
        ({"normalization": '{"mean": 0.5}'}, "malformed"),
        ({"width": "wide"}, "malformed"),
        ({"input_size": "64"}, "input size 64"),
        ({"classes": '["a"]'}, "distinct strings"),
        ({"classes": '["a", "a"]'}, "distinct strings"),
        ({"width": "0"}, "out of range"),
        ({"normalization": '{"mean": 0.5, "std": 0}'}, "out of range"),
        ({"stages": "16,64"}, "three channel counts"),
        ({"stages": "16,0,64"}, "three channel counts"),
        ({"stages": "a,b,c"}, "three channel counts"),
    ],
)
def test_bad_metadata(tmp_path, change, words):
    path = tmp_path / "bad.safetensors"
    save_file(trained_like().state_dict(), str(path), metadata=ModelInfo(width=TINY).to_metadata() | change)
    assert words in load_error(path)


def test_metadata_missing_a_key(tmp_path):
    meta = ModelInfo(width=TINY).to_metadata()
    del meta["normalization"]
    path = tmp_path / "bad.safetensors"
    save_file(trained_like().state_dict(), str(path), metadata=meta)
    assert "incomplete" in load_error(path)


def test_width_does_not_match_the_tensors(tmp_path):
    path = save_checkpoint(trained_like(width=0.25), ModelInfo(width=TINY), tmp_path / "w.safetensors")
    message = load_error(path)
    assert "width 0.125" in message and "conv1.0.weight has shape (32, 1, 3, 3), expected (16, 1, 3, 3)" in message


def test_class_count_does_not_match_the_tensors(tmp_path):
    path = save_checkpoint(trained_like(num_classes=5), ModelInfo(width=TINY), tmp_path / "c.safetensors")
    message = load_error(path)
    assert "7 classes" in message and "classifier.2.weight has shape (5, 64), expected (7, 64)" in message


def test_missing_and_unexpected_tensors(tmp_path):
    state = dict(trained_like().state_dict())
    del state["res3.1.0.weight"]
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "m.safetensors"
    save_file(state, str(path), metadata=ModelInfo(width=TINY).to_metadata())
    message = load_error(path)
    assert "missing ['res3.1.0.weight']" in message and "unexpected ['extra.weight']" in message


def test_truncated_checkpoint(tmp_path):
    path = save_checkpoint(trained_like(), ModelInfo(width=TINY), tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    load_error(path)


# --- the network ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "base, width, expected",
    [
        (128, 1.0, 128),
        (512, 1.0, 512),
        (128, 0.5, 64),
        (128, 0.125, 16),
        (512, 0.125, 64),
        (128, 0.3, 40),
        (128, 0.01, 8),
        (256, 0.33, 88),
        (128, 2.0, 256),
    ],
)
def test_channels(base, width, expected):
    assert channels(base, width) == expected


def conv_params(cin: int, cout: int) -> int:
    """Conv3x3 weights and bias, BatchNorm scale and shift."""
    return 9 * cin * cout + cout + 2 * cout


def test_parameter_count_at_full_width():
    stages = [(1, 128), (128, 256), (256, 512)]
    # per stage: conv(cin, c), conv(c, c)+pool, two convs of the residual block
    analytic = sum(conv_params(cin, c) + 3 * conv_params(c, c) for cin, c in stages) + 512 * 7 + 7
    assert analytic == 10_779_783
    assert sum(p.numel() for p in ResNet9().parameters()) == analytic


def conv_block_parts(block: nn.Sequential, cin: int, cout: int, pool: bool) -> None:
    kinds = [type(m) for m in block]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, ELU] + ([nn.MaxPool2d] if pool else [])
    conv, bn = block[0], block[1]
    assert (conv.in_channels, conv.out_channels) == (cin, cout)
    assert conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1) and conv.bias is not None
    assert bn.num_features == cout
    if pool:
        assert block[3].kernel_size == 2


def test_layer_structure_at_full_width():
    m = ResNet9()
    conv_block_parts(m.conv1, 1, 128, False)
    conv_block_parts(m.conv2, 128, 128, True)
    for block in m.res1:
        conv_block_parts(block, 128, 128, False)
    conv_block_parts(m.conv3, 128, 256, False)
    conv_block_parts(m.conv4, 256, 256, True)
    for block in m.res2:
        conv_block_parts(block, 256, 256, False)
    conv_block_parts(m.conv5, 256, 512, False)
    conv_block_parts(m.conv6, 512, 512, True)
    for block in m.res3:
        conv_block_parts(block, 512, 512, False)
    assert len(m.res1) == len(m.res2) == len(m.res3) == 2
    dropouts = [mod for mod in m.modules() if isinstance(mod, nn.Dropout)]
    assert len(dropouts) == 3 and all(d.p == 0.5 for d in dropouts)
    assert [type(mod) for mod in m.classifier] == [nn.MaxPool2d, nn.Flatten, nn.Linear]
    assert m.classifier[0].kernel_size == 6
    assert (m.classifier[2].in_features, m.classifier[2].out_features) == (512, 7)
    assert sum(isinstance(mod, nn.Conv2d) for mod in m.modules()) == 12
    assert sum(isinstance(mod, nn.MaxPool2d) for mod in m.modules()) == 4


def test_residual_connections_are_used():
    """Zeroing a residual block's last BatchNorm leaves the skip path: the output still depends on the input."""
    model = trained_like()
    for res in (model.res1, model.res2, model.res3):
        nn.init.zeros_(res[1][1].weight)
        nn.init.zeros_(res[1][1].bias)
    with torch.no_grad():
        a, b = model(torch.zeros(1, 1, 48, 48)), model(torch.ones(1, 1, 48, 48))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("n", [1, 3])
def test_output_shape_full_width(n):
    model = ResNet9().eval()
    with torch.no_grad():
        out = model(torch.randn(n, 1, 48, 48))
    assert out.shape == (n, 7) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_stages_set_each_stages_channels_in_place_of_width(tmp_path, batch):
    model = ResNet9(width=TINY, stages=(8, 24, 40)).eval()
    assert (model.stages, model.conv1[0].out_channels, model.res2[1][0].out_channels) == ((8, 24, 40), 8, 24)
    assert model.classifier[2].in_features == 40
    info = ModelInfo(width=TINY, stages=(8, 24, 40))
    assert info.to_metadata()["stages"] == "8,24,40" and info.channels == (8, 24, 40)
    assert info.shape == "stages 8,24,40" and ModelInfo(width=0.5).shape == "width 0.5"
    assert ModelInfo(width=0.5).channels == (64, 128, 256) and "stages" not in ModelInfo().to_metadata()
    path = save_checkpoint(model, info, tmp_path / "s.safetensors")
    loaded, loaded_info = load_checkpoint(path)
    assert loaded_info == info
    with torch.no_grad():
        assert torch.equal(loaded(batch), model.to(memory_format=torch.channels_last)(batch))


def test_stages_that_do_not_match_the_tensors(tmp_path):
    path = save_checkpoint(trained_like(), ModelInfo(width=TINY, stages=(8, 24, 40)), tmp_path / "s.safetensors")
    message = load_error(path)
    assert "stages 8,24,40" in message and "conv1.0.weight has shape (16, 1, 3, 3), expected (8, 1, 3, 3)" in message


@pytest.mark.parametrize("text", ["16,64", "16,64,192,8", "16;64;192", "0,64,192", "16,64,5000", ""])
def test_parse_stages_refuses_what_is_not_three_channel_counts(text):
    assert parse_stages(" 16, 64,192") == (16, 64, 192)
    with pytest.raises(ValueError, match="three channel counts"):
        parse_stages(text)


def test_output_shape_small_width_and_classes():
    model = ResNet9(num_classes=4, width=TINY).eval()
    assert model.classifier[2].in_features == 64
    with torch.no_grad():
        assert model(torch.randn(6, 1, 48, 48)).shape == (6, 4)


# --- ELU --------------------------------------------------------------------------------------------


def test_elu_matches_torch_elu_on_the_cpu_including_extremes():
    x = torch.cat([torch.randn(10_000) * 4, torch.tensor([-1e30, -80.0, -1e-6, 0.0, 1e-6, 1e30, float("inf")])])
    assert torch.allclose(ELU()(x), nn.functional.elu(x), rtol=1e-6, atol=1e-7)
    assert ELU()(torch.tensor(float("-inf"))).item() == -1.0
    assert ELU()(torch.tensor(float("nan"))).isnan()


def test_elu_in_bfloat16_is_within_bfloat16_rounding():
    x = (torch.randn(10_000) * 4).bfloat16()
    exact = nn.functional.elu(x.float())
    fast = ELU()(x)
    assert fast.dtype == torch.bfloat16
    # exp(x) is computed in bf16, whose steps are 2**-8 just below 1, before 1 is subtracted: one step off at most
    assert (fast.float() - exact).abs().max() <= 2**-8
    assert torch.equal(fast[x > 0], x[x > 0])


def test_elu_gradient():
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ELU(), (x,))
    x = torch.randn(1000, requires_grad=True)
    ELU()(x).sum().backward()
    assert torch.allclose(x.grad, torch.where(x > 0, 1.0, x.detach().exp()), rtol=1e-6)


def test_elu_keeps_the_torch_kernel_off_the_cpu(monkeypatch):
    from worker import model as model_module

    def cpu_kernel(x):
        raise AssertionError("the CPU kernel ran for a tensor on another device")

    monkeypatch.setattr(model_module._CPUELU, "apply", cpu_kernel)
    out = ELU(inplace=True)(torch.empty(2, 3, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 3)
    with pytest.raises(AssertionError, match="CPU kernel"):
        ELU()(torch.zeros(2))


def test_model_outputs_and_gradients_match_torch_elu():
    """The network with PyTorch's ELU in place of ours: same outputs and weight gradients."""
    model = trained_like().train()
    reference = copy.deepcopy(model)
    for block in reference.modules():
        for name, child in block.named_children():
            if isinstance(child, ELU):
                setattr(block, name, nn.ELU())
    x = torch.randn(4, 1, 48, 48)
    outs = []
    for m in (model, reference):
        m.zero_grad()
        torch.manual_seed(0)  # the same dropout masks
        out = m(x)
        out.square().sum().backward()
        outs.append((out, m.conv1[0].weight.grad))
    (out, grad), (ref_out, ref_grad) = outs
    assert torch.allclose(out, ref_out, rtol=1e-4, atol=1e-5)
    assert torch.allclose(grad, ref_grad, rtol=1e-3, atol=1e-5)


def test_dropout_is_active_only_in_training():
    model = trained_like().train()
    x = torch.randn(4, 1, 48, 48)
    with torch.no_grad():
        torch.manual_seed(0)
        a = model(x)
        torch.manual_seed(1)
        b = model(x)
        model.eval()
        assert torch.equal(model(x), model(x))
    assert not torch.allclose(a, b)


def test_load_onto_a_device(tmp_path, tiny_checkpoint):
    model, info = load_checkpoint(tiny_checkpoint, device="cpu")
    assert next(model.parameters()).device.type == "cpu"
    assert info.name == "tiny-test" and info.version == "t1" and info.width == TINY


# --- bundled models by name, ONNX models --------------------------------------------------------------


def test_resolve_weights_takes_bundled_names_and_paths(tmp_path, monkeypatch):
    import worker.model

    files = {"resnet9": tmp_path / "full.safetensors", "resnet9-small": tmp_path / "small.safetensors"}
    monkeypatch.setattr(worker.model, "BUNDLED", files)
    files["resnet9"].touch()
    assert resolve_weights("resnet9") == files["resnet9"]
    assert resolve_weights(None) == files["resnet9"]
    assert resolve_weights(tmp_path / "mine.safetensors") == tmp_path / "mine.safetensors"
    with pytest.raises(CheckpointError) as info:
        resolve_weights("resnet9-small")
    assert "'resnet9-small' is missing" in str(info.value) and str(files["resnet9-small"]) in str(info.value)


def test_a_mistyped_bundled_name_lists_the_names():
    message = load_error("resnet9-smal")
    assert "does not exist" in message and "resnet9, resnet9-small" in message


def onnx_error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_onnx(path)
    message = str(info.value)
    assert str(path) in message
    return message


def test_onnx_model_missing(tmp_path):
    assert "does not exist" in onnx_error(tmp_path / "gone.int8.onnx")


def test_onnx_model_of_random_bytes(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(bytes(range(256)) * 10)
    assert "not a readable ONNX model" in onnx_error(path)


def test_onnx_model_without_our_metadata(tiny_onnx, tmp_path):
    import onnx

    model = onnx.load(str(tiny_onnx["fp32"]))
    del model.metadata_props[:]
    path = tmp_path / "bare.onnx"
    onnx.save(model, str(path))
    assert "not an emotion model checkpoint" in onnx_error(path)


def test_onnx_model_whose_metadata_names_other_classes(tiny_onnx, tmp_path):
    from training.export import set_onnx_metadata

    path = tmp_path / "five.onnx"
    path.write_bytes(tiny_onnx["fp32"].read_bytes())
    set_onnx_metadata(path, ModelInfo(classes=("a", "b", "c", "d", "e"), width=TINY).to_metadata())
    assert "expected (2, 5)" in onnx_error(path)
