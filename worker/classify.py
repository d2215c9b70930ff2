"""Batched emotion inference on face crops."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from worker.model import (
    CheckpointError,
    ModelInfo,
    OnnxModel,
    ResNet9,
    load_checkpoint,
    load_onnx,
    onnx_beside,
    resolve_weights,
)

TTA_MODES = ("none", "flip", "tencrop", "rotate")
ROTATE_DEG = 8.0  # the rotate mode's angle: two thirds of the best recipe's largest training rotation (12 degrees)


def val_acc_key(tta: str) -> str:
    """The checkpoint metadata key of the val/ accuracy with test-time augmentation ``tta`` (see export)."""
    return "val_acc" if tta == "none" else f"val_acc_{tta}"


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced precision to run ``device`` in: bf16 or fp16 on CUDA, bf16 on a CPU that has it, else None."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_bf16() else None
    return None


def cpu_has_bf16() -> bool:
    """Whether PyTorch runs bf16 on this CPU at speed (AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def tta_views(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """Test-time views of a float batch (B, 1, H, W).

    ``none``: the batch itself; ``flip``: it and its mirror; ``tencrop``: five
    positions (centre and the four diagonal 2-pixel shifts, edges reflected)
    each with its mirror: the ten-crop of the literature for a network whose
    input size is fixed; ``rotate``: the batch and its rotations by
    ±:data:`ROTATE_DEG` degrees (bilinear, edges reflected, as the training
    augmentation warps), each with its mirror.
    """
    if mode == "none":
        return [x]
    if mode == "flip":
        return [x, x.flip(-1)]
    if mode == "tencrop":
        pad = F.pad(x, (2, 2, 2, 2), mode="reflect")
        h, w = x.shape[-2:]
        crops = [x] + [pad[..., dy : dy + h, dx : dx + w] for dy in (0, 4) for dx in (0, 4)]
        return crops + [c.flip(-1) for c in crops]
    if mode == "rotate":
        turned = [x, rotate(x, -ROTATE_DEG), rotate(x, ROTATE_DEG)]
        return turned + [t.flip(-1) for t in turned]
    raise ValueError(f"unknown test-time augmentation {mode!r}, expected one of {', '.join(TTA_MODES)}")


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """A float batch (B, C, H, W) rotated about its centre, positive degrees counter-clockwise on screen."""
    a = math.radians(degrees)
    # affine_grid maps output to input positions (x right, y down): the inverse of the turn on screen
    theta = x.new_tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]]).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


@torch.inference_mode()
def predict(
    model: ResNet9 | OnnxModel,
    info: ModelInfo,
    images: torch.Tensor,
    tta: str = "none",
    batch_size: int = 128,
    amp: torch.dtype | None = None,
) -> torch.Tensor:
    """Class probabilities (N, C), float32 on the CPU, for uint8 grey crops (N, 1, 48, 48) or (N, 48, 48).

    ``model`` is a ResNet9 or an :class:`~worker.model.OnnxModel`; ``amp`` runs
    a ResNet9 in that reduced precision (see :func:`autocast_dtype`).
    """
    device = model.device if isinstance(model, OnnxModel) else next(model.parameters()).device
    if images.dim() == 3:
        images = images.unsqueeze(1)
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device).float().div(255)  # not div_: a float input is the caller's
        x = (x - info.mean) / info.std
        views = tta_views(x, tta)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(torch.cat(views).contiguous(memory_format=torch.channels_last))
        probs = logits.float().softmax(dim=1).view(len(views), len(x), -1).mean(dim=0)
        out.append(probs.cpu())
    return torch.cat(out) if out else torch.empty(0, len(info.classes))


@dataclass(frozen=True)
class Plan:
    """What the worker serves and why, chosen from the ``model`` settings and the machine (see :func:`plan`)."""

    weights: Path  # the file loaded: a safetensors checkpoint (torch) or an ONNX model (onnxruntime)
    backend: str  # "torch" or "onnxruntime"
    device: torch.device
    amp: torch.dtype | None  # reduced precision of the torch backend; None for fp32 and for onnxruntime
    tta: str
    why: tuple[str, ...]  # one sentence per choice made for "auto"


def plan(settings, cuda: bool | None = None, bf16: bool | None = None) -> Plan:
    """Choose the weights, backend, device and precision that the ``model`` settings ask for on this machine.

    ``cuda`` and ``bf16`` say whether CUDA and a CPU with bf16 are there (default:
    ask PyTorch). What ``auto`` means, from the figures in docs/benchmarks.md:
    ``weights``: the full model on CUDA, the small one on a CPU, where the full
    one cannot keep up with a 30 frames/s camera; ``backend``: PyTorch on CUDA
    and on a CPU with bf16, int8 ONNX Runtime on another CPU (where PyTorch would
    run in fp32, several times slower); ``precision``: as :func:`autocast_dtype`;
    ``tta``: flip on CUDA, none on a CPU.
    Raises :class:`CheckpointError` or ``ValueError`` naming the setting when
    the settings contradict each other or the machine.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    bf16 = cpu_has_bf16() if bf16 is None else bf16
    why: list[str] = []
    if settings.device == "cuda" and not cuda:
        raise CheckpointError("model.device is 'cuda' but PyTorch sees no CUDA device")
    device = torch.device("cuda" if settings.device == "cuda" or (settings.device == "auto" and cuda) else "cpu")

    weights = settings.weights if settings.weights is not None else "auto"
    if str(weights) == "auto":
        weights = "resnet9" if device.type == "cuda" else "resnet9-small"
        why.append(
            "the full model on CUDA"
            if device.type == "cuda"
            else "the small model on a CPU: the full one cannot keep up with a 30 frames/s camera there "
            "(model.weights = 'resnet9' takes it back)"
        )
    path = resolve_weights(weights)
    is_onnx = path.suffix == ".onnx"
    backend = settings.backend
    if backend == "auto":
        if is_onnx:
            backend = "onnxruntime"
            why.append("ONNX Runtime for an ONNX file")
        elif device.type == "cuda":
            backend = "torch"
            why.append("PyTorch on CUDA")
        elif settings.precision != "auto":
            backend = "torch"
            why.append(f"PyTorch, for model.precision {settings.precision!r}")
        elif bf16:
            backend = "torch"
            why.append("PyTorch in bf16: this CPU has bf16")
        elif onnx_beside(path).is_file():
            backend = "onnxruntime"
            why.append("int8 ONNX Runtime: this CPU lacks bf16, where PyTorch would run in fp32")
        else:
            backend = "torch"
            why.append(f"PyTorch in fp32: this CPU lacks bf16 and there is no {onnx_beside(path).name} beside {path}")

    tta = settings.tta
    if tta == "auto":
        tta = "flip" if device.type == "cuda" else "none"
        why.append(
            "flip TTA on CUDA"
            if device.type == "cuda"
            else "no TTA on a CPU, where flip halves the frames per second (model.tta = 'flip' takes it back)"
        )
    if backend == "torch":
        if is_onnx:
            raise CheckpointError(f"model.backend 'torch' needs a safetensors checkpoint, {path} is an ONNX model")
        return Plan(path, backend, device, _precision(settings.precision, device, bf16), tta, tuple(why))
    if settings.device == "cuda":
        raise ValueError("model.backend 'onnxruntime' runs on the CPU; set model.device to 'cpu' or 'auto'")
    if settings.precision != "auto":
        raise ValueError(
            f"model.precision {settings.precision!r} applies to the torch backend; "
            "the onnxruntime backend computes in the precision of its ONNX file (leave model.precision 'auto')"
        )
    if not is_onnx:
        onnx = onnx_beside(path)
        if not onnx.is_file():
            raise CheckpointError(
                f"model.backend 'onnxruntime' needs an ONNX model: there is no {onnx.name} beside {path}; "
                f"write it with 'emotion-train export --run {path} --onnx --int8 --data FER2013_FOLDER', "
                "or set model.weights to an .onnx file"
            )
        path = onnx
    return Plan(path, backend, torch.device("cpu"), None, tta, tuple(why))


def _precision(precision: str, device: torch.device, bf16: bool) -> torch.dtype | None:
    if precision == "auto":
        if device.type == "cpu":
            return torch.bfloat16 if bf16 else None
        return autocast_dtype(device)
    if precision == "fp32":
        return None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("model.precision 'fp16' needs a CUDA device; use 'bf16' or 'fp32' on the CPU")
    return dtype


def load_model(p: Plan, threads: int = 0) -> tuple[ResNet9 | OnnxModel, ModelInfo]:
    """The network and metadata of the file ``p`` names, on its device, with the backend ``p`` chose."""
    if p.backend == "onnxruntime":
        return load_onnx(p.weights, threads)
    return load_checkpoint(p.weights, p.device)


def precision_name(model: ResNet9 | OnnxModel, amp: torch.dtype | None) -> str:
    """What ``model`` computes in when run with ``amp``: fp32, bf16, fp16, or an ONNX model's int8."""
    if isinstance(model, OnnxModel):
        return model.precision
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp]


class Classifier:
    """The emotion model ready to serve: chosen (:func:`plan`), loaded, on its device, warmed up.

    ``settings`` is the ``model`` section of the configuration. ``reserve_cores``
    are the cores other threads need (the pipeline's decoding and detection): with
    ``model.threads = 0``, PyTorch on a CPU gets the cores left over, at least one.
    On 2 cores, PyTorch's own two threads contending with detection raised the p99
    latency at 30 frames/s from 92 to 111 ms (docs/benchmarks.md, PyTorch threads).
    """

    def __init__(self, settings, reserve_cores: int = 0):
        self.plan = plan(settings)
        self.path, self.device, self.backend = self.plan.weights, self.plan.device, self.plan.backend
        self.amp, self.tta = self.plan.amp, self.plan.tta
        if self.backend == "torch":
            threads = settings.threads
            if not threads and reserve_cores and self.device.type == "cpu":
                threads = max(1, (os.cpu_count() or 1) - reserve_cores)
            if threads:
                torch.set_num_threads(threads)
        self.model, self.info = load_model(self.plan, settings.threads)
        # What the network runs on: PyTorch's thread count, or the setting ONNX Runtime was given (0: its default).
        self.threads = torch.get_num_threads() if self.backend == "torch" else settings.threads
        self.predict(torch.zeros(2, 1, self.info.input_size, self.info.input_size, dtype=torch.uint8))

    @property
    def precision(self) -> str:
        return precision_name(self.model, self.amp)

    def predict(self, crops) -> torch.Tensor:
        """Probabilities (N, classes) for uint8 grey crops (N, 48, 48) (a NumPy array or a tensor)."""
        images = torch.as_tensor(crops)
        return predict(self.model, self.info, images, self.tta, batch_size=max(1, len(images)), amp=self.amp)
