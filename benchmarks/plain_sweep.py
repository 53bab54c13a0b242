"""The floor for the main job: `python train.py -m model.act=relu,leaky,none` in plain PyTorch.

Trains the same three 784-256-10 MLPs one after another, as a researcher without a framework
would: the same MNIST split and normalisation, the same batch orders and initial weights (each
run seeded as the project seeds it), SGD lr 0.01 momentum 0.9, batch 64, validation every epoch,
the best-by-val weights tested at the end. torch and numpy only, so the process pays no
framework's import or start-up. `make bench` runs it as a whole process beside the main job.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ACTS = {"relu": nn.ReLU, "leaky": lambda: nn.LeakyReLU(0.01), "none": nn.Identity}


def read_idx(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    xt = torch.from_numpy(x.reshape(len(x), -1).copy()).float().div_(255).sub_(0.1307)
    return xt.div_(0.3081), torch.from_numpy(y.astype(np.int64))


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return sum(
            (net(xb).argmax(1) == yb).sum().item()
            for xb, yb in zip(x.split(1000), y.split(1000), strict=True)
        ) / len(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data/mnist"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--acts", nargs="+", default=list(ACTS))
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    d = args.data_dir
    x_all = read_idx(d / "train-images-idx3-ubyte")
    y_all = read_idx(d / "train-labels-idx1-ubyte")
    perm = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(0)).numpy()
    train, val = perm[:-5000], perm[-5000:]
    x, y = tensors(x_all[train], y_all[train])
    xv, yv = tensors(x_all[val], y_all[val])
    xt, yt = tensors(read_idx(d / "t10k-images-idx3-ubyte"), read_idx(d / "t10k-labels-idx1-ubyte"))
    results = {}
    for name in args.acts:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(784, 256), ACTS[name](), nn.Linear(256, 10))
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        best, best_state = -1.0, None
        for epoch in range(args.epochs):
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
            for idx in order.split(64):
                loss = F.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            acc = accuracy(net, xv, yv)
            if acc > best:
                best, best_state = acc, copy.deepcopy(net.state_dict())
        net.load_state_dict(best_state)
        results[name] = {"val/acc_best": best, "test/acc": accuracy(net, xt, yt)}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
