"""Swap nn.CrossEntropyLoss for fused_ce.CrossEntropyLoss in a classic training loop.

The tutorial classifier: two features, one hidden layer, three classes,
trained on three Gaussian blobs. It is trained twice from the same initial
weights and the same mini-batch order, once with each loss, and the two loss
curves are printed side by side. The script exits with status 1 if they
ever differ by more than 1e-5.

    python examples/train_classifier.py [--epochs 60]
"""

import argparse
import copy
import sys

import torch
from torch import nn

import fused_ce

TOLERANCE = 1e-5


def make_blobs(points_per_class: int, generator: torch.Generator):
    """Three Gaussian blobs in the plane; returns features (N, 2) and labels (N,)."""
    centers = torch.tensor([[0.0, 2.0], [-2.0, -1.0], [2.0, -1.0]])
    features = torch.cat([c + 0.8 * torch.randn(points_per_class, 2, generator=generator) for c in centers])
    labels = torch.arange(3).repeat_interleave(points_per_class)
    return features, labels


def train(model, criterion, features, labels, batch_orders, lr):
    """Mini-batch SGD; returns the mean training loss of every epoch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    curve = []
    for order in batch_orders:
        total = 0.0
        for batch in order:
            optimizer.zero_grad()
            loss = criterion(model(features[batch]), labels[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        curve.append(total / len(features))
    return curve


def accuracy(model, features, labels) -> float:
    with torch.no_grad():
        return (model(features).argmax(dim=1) == labels).float().mean().item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--every", type=int, default=0, help="print every k epochs (default: about 12 lines)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: tensors this small gain nothing from more, "
                             "and a busy machine makes thread synchronisation slow)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(args.seed)
    features, labels = make_blobs(200, generator)
    torch.manual_seed(args.seed)
    initial = nn.Sequential(nn.Linear(2, args.hidden), nn.ReLU(), nn.Linear(args.hidden, 3))
    # The same shuffled mini-batches for both runs.
    batch_orders = [torch.randperm(len(features), generator=generator).split(args.batch_size)
                    for _ in range(args.epochs)]

    reference_model, fused_model = copy.deepcopy(initial), copy.deepcopy(initial)
    reference = train(reference_model, nn.CrossEntropyLoss(), features, labels, batch_orders, args.lr)
    fused = train(fused_model, fused_ce.CrossEntropyLoss(), features, labels, batch_orders, args.lr)

    every = args.every or max(1, args.epochs // 12)
    print(f"{'epoch':>5}  {'nn.CrossEntropyLoss':>20}  {'fused_ce':>20}  {'|difference|':>12}")
    for epoch, (a, b) in enumerate(zip(reference, fused), start=1):
        if epoch % every == 0 or epoch in (1, args.epochs):
            print(f"{epoch:5d}  {a:20.8f}  {b:20.8f}  {abs(a - b):12.2e}")

    worst = max(abs(a - b) for a, b in zip(reference, fused))
    weights = max((p - q).abs().max().item()
                  for p, q in zip(reference_model.parameters(), fused_model.parameters()))
    print(f"final accuracy: nn.CrossEntropyLoss {accuracy(reference_model, features, labels):.2%}, "
          f"fused_ce {accuracy(fused_model, features, labels):.2%}")
    print(f"largest loss difference {worst:.2e}, largest final weight difference {weights:.2e}")
    if worst > TOLERANCE or weights > TOLERANCE:
        print(f"FAIL: the two runs diverge beyond {TOLERANCE:g}", file=sys.stderr)
        return 1
    print(f"OK: the two runs agree within {TOLERANCE:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
