"""Batched emotion inference on face crops."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from worker.model import ModelInfo, ResNet9

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
        try:
            return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
        except (AttributeError, RuntimeError):
            return None
    return None


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
    model: ResNet9,
    info: ModelInfo,
    images: torch.Tensor,
    tta: str = "none",
    batch_size: int = 128,
    amp: torch.dtype | None = None,
) -> torch.Tensor:
    """Class probabilities (N, C), float32 on the CPU, for uint8 grey crops (N, 1, 48, 48) or (N, 48, 48).

    ``amp`` runs the network in that reduced precision (see :func:`autocast_dtype`).
    """
    device = next(model.parameters()).device
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


class Classifier:
    """The emotion model ready to serve: loaded, on its device, warmed up.

    ``settings`` is the ``model`` section of the configuration.
    """

    def __init__(self, settings):
        from worker.model import BUNDLED_WEIGHTS, CheckpointError, load_checkpoint

        if settings.threads:
            torch.set_num_threads(settings.threads)
        if settings.device == "cuda" and not torch.cuda.is_available():
            raise CheckpointError("model.device is 'cuda' but PyTorch sees no CUDA device")
        self.device = torch.device(
            "cuda" if settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available()) else "cpu"
        )
        self.path = settings.weights or BUNDLED_WEIGHTS
        if settings.weights is None and not BUNDLED_WEIGHTS.is_file():
            raise CheckpointError(
                f"no model is bundled at {BUNDLED_WEIGHTS} and model.weights is not set; "
                "train one with 'emotion-train fit' and 'emotion-train export' (see README, Training), "
                "or point model.weights (EMOTION_MODEL__WEIGHTS) at a checkpoint"
            )
        self.model, self.info = load_checkpoint(self.path, self.device)
        self.amp = self._precision(settings.precision)
        self.tta = settings.tta
        self.predict(torch.zeros(2, 1, self.info.input_size, self.info.input_size, dtype=torch.uint8))

    def _precision(self, precision: str) -> torch.dtype | None:
        if precision == "auto":
            return autocast_dtype(self.device)
        if precision == "fp32":
            return None
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        if self.device.type == "cpu" and dtype == torch.float16:
            raise ValueError("model.precision 'fp16' needs a CUDA device; use 'bf16' or 'fp32' on the CPU")
        return dtype

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp]

    def predict(self, crops) -> torch.Tensor:
        """Probabilities (N, classes) for uint8 grey crops (N, 48, 48) (a NumPy array or a tensor)."""
        images = torch.as_tensor(crops)
        return predict(self.model, self.info, images, self.tta, batch_size=max(1, len(images)), amp=self.amp)
