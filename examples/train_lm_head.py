"""Train a language model's output layer with fused_ce.linear_cross_entropy.

A toy next-token model (an embedding, one hidden layer, an LM head over a
vocabulary of --vocab tokens with Gemma 2's final-logit softcap) learns a
fixed random bigram table. It is trained twice from the same initial weights
on the same batches: once with the head and the loss written out in PyTorch
(F.linear, the softcap, F.cross_entropy: the (tokens, vocab) logits exist),
once with fused_ce.linear_cross_entropy (the logits are produced and turned
into their gradient a chunk of rows at a time, never all at once). The loss
curves are printed side by side; the script exits with status 1 if they ever
differ by more than 1e-4.

    python examples/train_lm_head.py [--steps 40] [--vocab 5000] [--softcap 30]
"""

import argparse
import copy
import sys

import torch
import torch.nn.functional as F
from torch import nn

import fused_ce

TOLERANCE = 1e-4


class TinyLM(nn.Module):
    """Token -> embedding -> one hidden layer -> hidden state; the head is separate."""

    def __init__(self, vocab: int, width: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Sequential(nn.Linear(width, width), nn.GELU())
        self.head = nn.Linear(width, vocab, bias=False)

    def hidden(self, tokens):
        return self.mix(self.embed(tokens))


def reference_loss(model, tokens, targets, softcap, ignore_index):
    logits = model.head(model.hidden(tokens))  # (tokens, vocab): the tensor the fused head avoids
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index)


def fused_loss(model, tokens, targets, softcap, ignore_index):
    return fused_ce.linear_cross_entropy(model.hidden(tokens), model.head.weight, targets,
                                         softcap=softcap or None, ignore_index=ignore_index)


def train(model, loss_fn, batches, softcap, ignore_index, lr):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    curve = []
    for tokens, targets in batches:
        optimizer.zero_grad()
        loss = loss_fn(model, tokens, targets, softcap, ignore_index)
        loss.backward()
        optimizer.step()
        curve.append(loss.item())
    return curve


def make_batches(vocab, steps, batch_tokens, generator, ignore_index):
    """Tokens and their successors under a fixed random bigram table; a tenth of the
    targets are padding (ignore_index), as in packed sequences."""
    table = torch.randint(0, vocab, (vocab, 4), generator=generator)  # four likely successors each
    batches = []
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (batch_tokens,), generator=generator)
        choice = torch.randint(0, 4, (batch_tokens,), generator=generator)
        targets = table[tokens, choice]
        padding = torch.rand(batch_tokens, generator=generator) < 0.1
        batches.append((tokens, targets.masked_fill(padding, ignore_index)))
    return batches


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--vocab", type=int, default=5000)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch-tokens", type=int, default=512)
    parser.add_argument("--softcap", type=float, default=30.0, help="0 for none")
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ignore_index = -100

    generator = torch.Generator().manual_seed(args.seed)
    batches = make_batches(args.vocab, args.steps, args.batch_tokens, generator, ignore_index)
    torch.manual_seed(args.seed)
    initial = TinyLM(args.vocab, args.width)
    reference_model, fused_model = copy.deepcopy(initial), copy.deepcopy(initial)
    reference = train(reference_model, reference_loss, batches, args.softcap, ignore_index, args.lr)
    fused = train(fused_model, fused_loss, batches, args.softcap, ignore_index, args.lr)

    logits_mib = args.batch_tokens * args.vocab * 4 / 2**20
    print(f"{args.batch_tokens} tokens x {args.vocab} classes per step: the reference holds "
          f"{logits_mib:.1f} MiB of float32 logits (and more of their gradient); fused_ce a chunk at a time")
    every = max(1, args.steps // 10)
    print(f"{'step':>5}  {'F.linear + F.cross_entropy':>27}  {'linear_cross_entropy':>21}  {'|difference|':>12}")
    for step, (a, b) in enumerate(zip(reference, fused), start=1):
        if step % every == 0 or step in (1, args.steps):
            print(f"{step:5d}  {a:27.6f}  {b:21.6f}  {abs(a - b):12.2e}")

    worst = max(abs(a - b) for a, b in zip(reference, fused))
    print(f"largest loss difference {worst:.2e}")
    if worst > TOLERANCE:
        print(f"FAIL: the two runs diverge beyond {TOLERANCE:g}", file=sys.stderr)
        return 1
    print(f"OK: the two runs agree within {TOLERANCE:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
