"""Copy-decoder output: the mixture at the copied ids only vs a dense copy distribution over the vocabulary.

    python benchmarks/copy_mixture_speed.py [--repeats 30]

Times forward + backward of the pointer-generator mixture log(g · p_vocab + (1 − g) · p_copy) at the `cpu`
preset's training shapes (batch 16, 10 answer tokens, 64 text tokens, MiniLM's 30,522-token vocabulary), once as
``pv2tea.models.copy_decoder.mixture_log_probs`` computes it and once with the dense (B, A, V) copy distribution
that the first copy decoder built (2026-11-25). Prints the median of each and their ratio, measured in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pv2tea.models.copy_decoder import mixture_log_probs


def dense_mixture(vocab_logits, attn, generate, copy_ids):
    copy = torch.zeros_like(vocab_logits).scatter_add(
        2, copy_ids[:, None, :].expand(-1, attn.shape[1], -1), attn
    )  # (B, A, V)
    return torch.log((generate * vocab_logits.softmax(-1) + (1 - generate) * copy).clamp_min(1e-12))


def time_it(fn, inputs, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats + 2):
        leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
        t = time.perf_counter()
        out = fn(*leaves)
        out.sum().backward()
        times.append(time.perf_counter() - t)
    return times[2:]  # two warm-up calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--answer-tokens", type=int, default=10)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=30522)
    args = parser.parse_args()
    torch.manual_seed(0)
    B, A, T, V = args.batch, args.answer_tokens, args.text_tokens, args.vocab
    inputs = [
        torch.randn(B, A, V),
        torch.randn(B, A, T).softmax(-1),
        torch.rand(B, A, 1),
        torch.randint(1000, V, (B, T)),
    ]
    with torch.no_grad():
        torch.testing.assert_close(mixture_log_probs(*inputs).exp(), dense_mixture(*inputs).exp())
    sparse = statistics.median(time_it(mixture_log_probs, inputs, args.repeats))
    dense = statistics.median(time_it(dense_mixture, inputs, args.repeats))
    print(f"shapes B={B} A={A} T={T} V={V}, {torch.get_num_threads()} thread(s), {args.repeats} repeats")
    print(f"dense copy distribution : median {dense * 1e3:.1f} ms (forward + backward)")
    print(f"copied ids only         : median {sparse * 1e3:.1f} ms (forward + backward)")
    print(f"speed-up: {dense / sparse:.2f}x")


if __name__ == "__main__":
    main()
