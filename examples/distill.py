"""Knowledge distillation, as the seed article describes it: a large teacher
is trained first, then a student with half its width learns from the
teacher's softened outputs (and the hard labels) through
bigkernels.linear_distillation_loss, which never holds either [tokens x
vocabulary] logits matrix. A second student of the same size trains on the
hard labels alone, for comparison.

    python examples/distill.py [--steps 300] [--device cpu|cuda]

The language is synthetic and random: each token is followed by one of a
few tokens, with probabilities drawn per token, so the next token cannot be
predicted exactly (the best loss is the language's entropy, printed) and the
teacher's soft outputs carry more than the one sampled label does.
"""

import argparse
import time

import torch

import bigkernels


def make_language(vocab, successors, gen):
    """A transition matrix: every token has `successors` possible next tokens."""
    probs = torch.zeros(vocab, vocab)
    for token in range(vocab):
        nxt = torch.randperm(vocab, generator=gen)[:successors]
        probs[token, nxt] = torch.distributions.Dirichlet(torch.ones(successors)).sample()
    return probs


def sample(probs, size, length, gen):
    seq = [torch.randint(probs.shape[0], (size,), generator=gen)]
    for _ in range(length):
        seq.append(torch.multinomial(probs[seq[-1]], 1, generator=gen).squeeze(1))
    return torch.stack(seq, 1)


def train(model, steps, data, lr, loss_of):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    t0 = time.perf_counter()
    for step in range(steps):
        seq = data()
        loss = loss_of(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


@torch.no_grad()
def evaluate(model, seq):
    logits = model(seq[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1))
    accuracy = (logits.argmax(-1) == seq[:, 1:]).float().mean()
    return loss.item(), accuracy.item()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="training steps of each student (the teacher: twice)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--beta", type=float, default=0.0, help="0: forward KL (Hinton), 1: reverse KL, else JSD")
    p.add_argument("--hard-weight", type=float, default=0.5)
    args = p.parse_args()

    gen = torch.Generator().manual_seed(0)
    vocab, length, batch = 256, 32, 32
    probs = make_language(vocab, 4, gen)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(1).mean().item()
    data = lambda: sample(probs, batch, length, gen).to(args.device)  # noqa: E731
    test = sample(probs, 512, length, torch.Generator().manual_seed(1)).to(args.device)

    def model(width):
        torch.manual_seed(0)
        return bigkernels.models.Transformer(vocab, d_model=width, nhead=4, num_layers=2, max_len=length,
                                             device=args.device)

    teacher, distilled, hard_only = model(128), model(64), model(64)
    seconds = train(teacher, 2 * args.steps, data, 3e-3, lambda x, y: teacher(x, labels=y))
    print(f"the language's entropy (the best loss): {entropy:.3f}")
    print(f"teacher  (d_model 128)  loss {evaluate(teacher, test)[0]:.3f}  accuracy "
          f"{evaluate(teacher, test)[1]:.3f}  ({seconds:.1f} s)")
    teacher.eval()

    def distillation_loss(x, y):
        with torch.no_grad():
            teacher_features = teacher.features(x)
        return bigkernels.linear_distillation_loss(
            distilled.features(x), distilled.head.weight, teacher_features, teacher.head.weight, y,
            temperature=args.temperature, beta=args.beta, hard_weight=args.hard_weight)

    for name, student, loss_of in (("hard labels", hard_only, lambda x, y: hard_only(x, labels=y)),
                                   ("distilled", distilled, distillation_loss)):
        seconds = train(student, args.steps, data, 3e-3, loss_of)
        loss, accuracy = evaluate(student, test)
        print(f"student (d_model 64), {name:11s}  loss {loss:.3f}  accuracy {accuracy:.3f}  ({seconds:.1f} s)")


if __name__ == "__main__":
    main()
