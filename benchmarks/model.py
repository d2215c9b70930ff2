"""Measure the ResNet9 alone: inference and training images per second, with this project's ELU and PyTorch's.

    python benchmarks/model.py [--width W ...] [--stages C1,C2,C3 ...] [--batch B] [--steps N] [--device D]

Prints, for each width and each set of stage channels, the images per second of an inference forward pass and
of a training step (forward, backward and the recipe's optimizer step),
in bf16 on the CPU (the worker's and the trainer's precision there), on random
input. Each is measured twice: with the network as it is (`worker.model.ELU`)
and with PyTorch's `nn.ELU` in its place.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.cli import stages_arg  # noqa: E402
from training.fit import Hyper, make_optimizer  # noqa: E402
from worker.classify import autocast_dtype  # noqa: E402
from worker.model import ELU, ModelInfo, ResNet9  # noqa: E402


def with_torch_elu(model: ResNet9) -> ResNet9:
    for block in model.modules():
        for name, child in block.named_children():
            if isinstance(child, ELU):
                setattr(block, name, nn.ELU(inplace=True))
    return model


def rate(fn, batch: int, steps: int) -> float:
    fn()  # warm-up: oneDNN picks its kernels on the first call
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return batch * steps / (time.perf_counter() - t)


def measure(shape: dict, torch_elu: bool, batch: int, steps: int, dev: torch.device) -> tuple[float, float]:
    torch.manual_seed(0)
    model = ResNet9(**shape)
    if torch_elu:
        model = with_torch_elu(model)
    model = model.to(dev, memory_format=torch.channels_last)
    amp = autocast_dtype(dev)
    x = torch.randn(batch, 1, 48, 48, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 7, (batch,), device=dev)
    opt = make_optimizer(Hyper(), model)

    def infer():
        with torch.inference_mode(), torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            model(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def train_step():
        with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    model.eval()
    inference = rate(infer, batch, steps)
    model.train()
    training = rate(train_step, batch, steps)
    return inference, training


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=float, nargs="+", default=[1.0, 0.5])
    ap.add_argument("--stages", type=stages_arg, nargs="*", default=[], metavar="C1,C2,C3")
    ap.add_argument("--batch", type=int, default=128, help="the recipe's batch size")
    ap.add_argument("--steps", type=int, default=5, help="timed batches per figure")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    dev = torch.device(args.device)
    print(
        f"device {dev}, precision {autocast_dtype(dev) or 'fp32'}, batch {args.batch}, "
        f"torch threads {torch.get_num_threads()}"
    )
    shapes = [{"width": w} for w in args.width] + [{"stages": s} for s in args.stages]
    for shape in shapes:
        name = ModelInfo(**shape).shape
        for torch_elu in (False, True):
            inference, training = measure(shape, torch_elu, args.batch, args.steps, dev)
            elu = "nn.ELU" if torch_elu else "ELU"
            print(
                f"  {name:<16}  {elu:<6}  inference {inference:6.1f} images/s   training {training:6.1f} images/s",
                flush=True,
            )


if __name__ == "__main__":
    main()
