"""The ResNet9 emotion classifier and its safetensors checkpoint format.

Both the service and the training code use this module, so the network that is
trained is the network that is served.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

FORMAT = "emotion-resnet9"
ARCH = "resnet9"
CLASSES = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
INPUT_SIZE = 48
# Mean and standard deviation of FER2013 train/ pixels scaled to [0, 1].
FER_MEAN = 0.5077
FER_STD = 0.2550
WEIGHTS_DIR = Path(__file__).parent / "weights"
# The models bundled with the worker, by the name ``model.weights`` and ``--weights`` take:
# the full ResNet9 and a narrow one (16, 64 and 192 channels) distilled from it (see docs/benchmarks.md).
BUNDLED = {
    "resnet9": WEIGHTS_DIR / "resnet9.safetensors",
    "resnet9-small": WEIGHTS_DIR / "resnet9-small.safetensors",
}
BUNDLED_WEIGHTS = BUNDLED["resnet9"]


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not describe a usable model."""


def resolve_weights(weights: str | Path | None) -> Path:
    """The checkpoint file ``weights`` names: a bundled model's name (:data:`BUNDLED`), or a path.

    ``None`` means the full bundled model. A bundled name whose file is missing
    raises :class:`CheckpointError` saying so; a path is returned as it is
    (loading it names any problem).
    """
    if weights is None:
        weights = "resnet9"
    if str(weights) in BUNDLED:
        path = BUNDLED[str(weights)]
        if not path.is_file():
            raise CheckpointError(
                f"the bundled model {str(weights)!r} is missing: {path} does not exist; reinstall the package, "
                "or set model.weights (EMOTION_MODEL__WEIGHTS, --weights) to a checkpoint file"
            )
        return path
    return Path(weights)


class _CPUELU(torch.autograd.Function):
    """ELU as max(exp(min(x, 0)) - 1, x), with the gradient taken from the output."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = torch.maximum(x.clamp(max=0).exp_().sub_(1), x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return grad * y.clamp(max=0).add_(1)  # d/dx is 1 where x > 0, exp(x) = y + 1 elsewhere


class ELU(nn.ELU):
    """ELU (alpha 1) that is fast on the CPU as well.

    PyTorch's CPU ELU is slow: with this one a full-width forward pass in bf16
    runs about a quarter faster on the 2-core AMD EPYC of the README's
    benchmarks (``benchmarks/model.py``). It differs only in the rounding of
    ``exp(x) - 1`` near zero, and it always returns a new tensor. Other devices
    keep PyTorch's own kernel.
    """

    def __init__(self, inplace: bool = False):
        super().__init__(alpha=1.0, inplace=inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            return _CPUELU.apply(x)
        return super().forward(x)


def conv_block(cin: int, cout: int, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel_size=3, padding=1),
        nn.BatchNorm2d(cout),
        ELU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class ResNet9(nn.Module):
    """ResNet9 for 1x48x48 grey faces.

    Three stages of conv, conv+pool and a two-conv residual block with 128, 256
    and 512 channels (times ``width``, or the three counts of ``stages``),
    dropout 0.5 after each residual block, then MaxPool2d(6), Flatten and a
    linear layer to ``num_classes`` logits.
    """

    def __init__(
        self,
        num_classes: int = len(CLASSES),
        width: float = 1.0,
        in_channels: int = 1,
        stages: tuple[int, int, int] | None = None,
    ):
        super().__init__()
        c1, c2, c3 = self.stages = stage_channels(width, stages)
        self.width = width
        self.conv1 = conv_block(in_channels, c1)
        self.conv2 = conv_block(c1, c1, pool=True)
        self.res1 = nn.Sequential(conv_block(c1, c1), conv_block(c1, c1))
        self.drop1 = nn.Dropout(0.5)
        self.conv3 = conv_block(c1, c2)
        self.conv4 = conv_block(c2, c2, pool=True)
        self.res2 = nn.Sequential(conv_block(c2, c2), conv_block(c2, c2))
        self.drop2 = nn.Dropout(0.5)
        self.conv5 = conv_block(c2, c3)
        self.conv6 = conv_block(c3, c3, pool=True)
        self.res3 = nn.Sequential(conv_block(c3, c3), conv_block(c3, c3))
        self.drop3 = nn.Dropout(0.5)
        self.classifier = nn.Sequential(nn.MaxPool2d(6), nn.Flatten(), nn.Linear(c3, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.conv1(x))
        x = self.drop1(self.res1(x) + x)
        x = self.conv4(self.conv3(x))
        x = self.drop2(self.res2(x) + x)
        x = self.conv6(self.conv5(x))
        x = self.drop3(self.res3(x) + x)
        return self.classifier(x)


def channels(base: int, width: float) -> int:
    """Channel count of a layer with ``base`` channels at full width, at least 8."""
    return max(8, int(math.ceil(base * width / 8) * 8))


def stage_channels(width: float, stages: tuple[int, int, int] | None = None) -> tuple[int, int, int]:
    """The channels of the three stages: ``stages`` when given, else the full network's times ``width``."""
    if stages is not None:
        return tuple(stages)
    return tuple(channels(n, width) for n in (128, 256, 512))


MAX_CHANNELS = 4096  # per stage, in ``stages``


def valid_stages(stages: tuple[int, ...]) -> bool:
    """Whether ``stages`` is three channel counts, each in [1, MAX_CHANNELS]."""
    return len(stages) == 3 and all(1 <= c <= MAX_CHANNELS for c in stages)


def parse_stages(text: str) -> tuple[int, int, int]:
    """``"16,64,192"`` -> (16, 64, 192): three channel counts, each in [1, 4096]."""
    try:
        stages = tuple(int(part) for part in text.replace(" ", "").split(","))
    except ValueError:
        stages = ()
    if not valid_stages(stages):
        raise ValueError(f"stages must be three channel counts in [1, {MAX_CHANNELS}] such as 16,64,192, got {text!r}")
    return stages


@dataclass(frozen=True)
class ModelInfo:
    """What a checkpoint says about its model; everything inference needs."""

    classes: tuple[str, ...] = CLASSES
    width: float = 1.0
    # The three stages' channels of a network not of one width (``ResNet9(stages=...)``); None: from ``width``.
    stages: tuple[int, int, int] | None = None
    input_size: int = INPUT_SIZE
    mean: float = FER_MEAN
    std: float = FER_STD
    name: str = "resnet9-fer2013"
    version: str = "0"
    extra: dict[str, str] = field(default_factory=dict)

    def to_metadata(self) -> dict[str, str]:
        meta = {str(k): str(v) for k, v in self.extra.items()}
        meta.update(
            format=FORMAT,
            arch=ARCH,
            width=repr(self.width),
            classes=json.dumps(list(self.classes)),
            input_size=str(self.input_size),
            input_channels="1",
            normalization=json.dumps({"mean": self.mean, "std": self.std}),
            name=self.name,
            version=self.version,
        )
        if self.stages is not None:
            meta["stages"] = ",".join(map(str, self.stages))
        return meta

    @property
    def channels(self) -> tuple[int, int, int]:
        """The channels of the network's three stages."""
        return stage_channels(self.width, self.stages)

    @property
    def shape(self) -> str:
        """The network's size in words, for logs and messages: ``width 0.5`` or ``stages 16,64,192``."""
        if self.stages is not None:
            return "stages " + ",".join(map(str, self.stages))
        return f"width {self.width:g}"

    @classmethod
    def from_metadata(cls, meta: dict[str, str] | None, source: str) -> ModelInfo:
        meta = dict(meta or {})
        if meta.get("format") != FORMAT:
            raise CheckpointError(
                f"{source}: not an emotion model checkpoint "
                f"(metadata 'format' is {meta.get('format')!r}, expected {FORMAT!r})"
            )
        if meta.get("arch") != ARCH:
            raise CheckpointError(f"{source}: architecture {meta.get('arch')!r} is not supported, expected {ARCH!r}")
        try:
            classes = tuple(json.loads(meta["classes"]))
            width = float(meta["width"])
            stages = parse_stages(meta["stages"]) if "stages" in meta else None
            input_size = int(meta["input_size"])
            norm = json.loads(meta["normalization"])
            mean, std = float(norm["mean"]), float(norm["std"])
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{source}: metadata is incomplete or malformed ({exc!r})") from None
        if input_size != INPUT_SIZE:
            raise CheckpointError(f"{source}: input size {input_size} is not supported, the network takes {INPUT_SIZE}")
        if len(classes) < 2 or len(set(classes)) != len(classes) or not all(isinstance(c, str) for c in classes):
            raise CheckpointError(f"{source}: class names must be distinct strings, got {list(classes)}")
        if not 0 < width <= 4 or not std > 0:
            raise CheckpointError(f"{source}: width {width} or normalisation std {std} is out of range")
        known = {
            "format",
            "arch",
            "width",
            "stages",
            "classes",
            "input_size",
            "input_channels",
            "normalization",
            "name",
            "version",
        }
        return cls(
            classes=classes,
            width=width,
            stages=stages,
            input_size=input_size,
            mean=mean,
            std=std,
            name=meta.get("name", "resnet9-fer2013"),
            version=meta.get("version", "0"),
            extra={k: v for k, v in meta.items() if k not in known},
        )


def save_checkpoint(model: ResNet9, info: ModelInfo, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the model's weights and ``info`` to a safetensors file at ``path``.

    ``dtype`` (for example ``torch.float16``) converts floating-point tensors.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[key] = tensor.contiguous()
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=info.to_metadata())
    # safetensors creates its files readable by their owner only; a model is
    # read by the service's own user, so it gets the usual umask-based mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    tmp.replace(path)
    return path


def read_info(path: str | Path) -> ModelInfo:
    """Read only the metadata of the checkpoint at ``path``."""
    from safetensors import safe_open

    path = Path(path)
    _check_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return ModelInfo.from_metadata(f.metadata(), str(path))
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises several types for a bad header
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[ResNet9, ModelInfo]:
    """Load a checkpoint written by :func:`save_checkpoint` into a ResNet9 in eval mode, channels_last.

    Raises :class:`CheckpointError` naming the file and the problem when the file
    is missing, is not safetensors, lacks the metadata, or its tensors do not fit
    the architecture the metadata describes. Never unpickles anything.
    """
    from safetensors.torch import load_file

    path = Path(path)
    info = read_info(path)
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: tensors could not be read ({exc})") from None
    model = ResNet9(num_classes=len(info.classes), width=info.width, stages=info.stages)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        if wrong_shape:
            k = wrong_shape[0]
            parts.append(f"{k} has shape {tuple(state[k].shape)}, expected {tuple(expected[k].shape)}")
        raise CheckpointError(
            f"{path}: tensors do not match a ResNet9 of {info.shape} with {len(info.classes)} classes: "
            + "; ".join(parts)
        )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    # channels_last: the layout the model is trained in and the faster one for its convolutions
    # (about 13% on a CPU with bf16, more on CUDA).
    return model.to(device, memory_format=torch.channels_last).eval(), info


def _check_file(path: Path) -> None:
    if not path.exists():
        # A bare word is most likely a mistyped bundled model's name.
        hint = f" (the bundled models are {', '.join(BUNDLED)})" if len(path.parts) == 1 and not path.suffix else ""
        raise CheckpointError(f"model checkpoint {path} does not exist{hint}")
    if not path.is_file():
        raise CheckpointError(f"model checkpoint {path} is not a file")


def onnx_beside(path: str | Path, precision: str = "int8") -> Path:
    """Where ``emotion-train export --onnx`` puts the ONNX copy of the checkpoint at ``path``.

    ``resnet9.safetensors`` gives ``resnet9.int8.onnx`` (``resnet9.onnx`` for fp32), in the same folder.
    """
    path = Path(path)
    return path.with_name(f"{path.stem}.{precision}.onnx" if precision != "fp32" else f"{path.stem}.onnx")


class OnnxModel:
    """A model exported by ``emotion-train export --onnx``, run by ONNX Runtime on the CPU.

    Called like the ResNet9: normalised float faces (N, 1, 48, 48) in, logits
    (N, classes) out, as float32 tensors on the CPU. ``precision`` is what the
    file computes in: ``int8`` (quantized) or ``fp32``. ``threads`` sets ONNX
    Runtime's threads for one call (0: one per core).
    """

    device = torch.device("cpu")

    def __init__(self, path: str | Path, threads: int = 0):
        import onnxruntime as ort

        path = Path(path)
        _check_file(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # ONNX Runtime's warnings about its own graph rewrites are not the user's
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ONNX Runtime raises its own types for unreadable or invalid models
            raise CheckpointError(f"{path}: not a readable ONNX model ({str(exc).strip()[:300]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.info = ModelInfo.from_metadata(meta, str(path))
        self.precision = meta.get("onnx_precision", "fp32")
        self.input = self.session.get_inputs()[0].name
        self.path = path

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input: x.detach().float().contiguous().cpu().numpy()})[0]
        return torch.from_numpy(out)

    def eval(self) -> OnnxModel:
        return self


def load_onnx(path: str | Path, threads: int = 0) -> tuple[OnnxModel, ModelInfo]:
    """Load an ONNX model written by ``emotion-train export --onnx`` and the metadata it carries.

    Raises :class:`CheckpointError` naming the file when it is missing, not ONNX,
    lacks the metadata, or does not give one logit per class for a batch of faces.
    """
    model = OnnxModel(path, threads)
    info = model.info
    try:
        out = model(torch.zeros(2, 1, info.input_size, info.input_size))
    except Exception as exc:
        raise CheckpointError(f"{path}: the ONNX model does not run on a batch of faces ({exc})") from None
    if tuple(out.shape) != (2, len(info.classes)):
        raise CheckpointError(
            f"{path}: the ONNX model gives outputs of shape {tuple(out.shape)} for 2 faces, "
            f"expected (2, {len(info.classes)}) for its classes {list(info.classes)}"
        )
    return model, info
