#!/usr/bin/env python3
"""Two models' answer-token KL on the same shapes split, question by question.

    python3 bench/kl_paired.py A_EVAL_DIR B_EVAL_DIR [--json]

Each directory is an `eqat eval --bench shapes --reference FP --out DIR` output, which holds answer_kl.jsonl (one
{question_id, kl, answer_tokens} per question). The mean KL of a quantized model is carried by a few questions (on the
default model at W3g128, the largest five hold half of it or more), so two means from one run each can differ by
more than the models do. Reported here, on the questions both files hold:
  - each mean and median;
  - the paired difference of the means (A - B) with its standard error (the standard deviation of the per-question
    differences over sqrt(n));
  - on how many questions each model is the lower (ties counted apart), and the sign test's two-sided p-value;
  - the share of each mean that its largest 1 and 5 questions carry.
"""
import argparse
import json
import math
import sys
from pathlib import Path


def fail(msg: str):
    """Bad input: one line on stderr, exit code 2."""
    print(f"kl_paired.py: {msg}", file=sys.stderr)
    sys.exit(2)


def load(eval_dir: Path) -> dict:
    path = Path(eval_dir) / "answer_kl.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        fail(f"{path}: {e.strerror} (run eqat eval --bench shapes --reference ... first)")
    out = {}
    for i, line in enumerate(lines, 1):
        try:
            j = json.loads(line)
            out[json.dumps(j["question_id"])] = float(j["kl"])
        except (ValueError, KeyError, TypeError):
            fail(f"{path}:{i}: not a {{question_id, kl}} line")
    return out


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact binomial p-value of `wins` against `losses` under p = 1/2 (ties left out)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    log_half_n = -n * math.log(2.0)
    tail = sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half_n)
               for i in range(k + 1))
    return min(1.0, 2.0 * tail)


def median(v: list) -> float:
    s = sorted(v)
    h = len(s) // 2
    return s[h] if len(s) % 2 else 0.5 * (s[h - 1] + s[h])


def top_share(v: list, k: int) -> float:
    total = sum(v)
    return sum(sorted(v, reverse=True)[:k]) / total if total > 0 else 0.0


def paired(a: dict, b: dict) -> dict:
    keys = sorted(set(a) & set(b))
    n = len(keys)
    if n < 2:
        fail(f"only {n} question(s) in both files")
    va, vb = [a[k] for k in keys], [b[k] for k in keys]
    d = [x - y for x, y in zip(va, vb)]
    m = sum(d) / n
    sem = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1) / n)
    a_lower = sum(1 for x, y in zip(va, vb) if x < y)
    b_lower = sum(1 for x, y in zip(va, vb) if y < x)
    return dict(n=n, mean_a=sum(va) / n, mean_b=sum(vb) / n, median_a=median(va), median_b=median(vb),
                mean_diff_a_minus_b=m, paired_sem=sem, a_lower=a_lower, b_lower=b_lower, ties=n - a_lower - b_lower,
                sign_test_p=sign_test_p(a_lower, b_lower),
                top1_share_a=top_share(va, 1), top1_share_b=top_share(vb, 1),
                top5_share_a=top_share(va, 5), top5_share_b=top_share(vb, 5),
                only_in_a=len(set(a) - set(b)), only_in_b=len(set(b) - set(a)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, help="eval output directory of model A")
    ap.add_argument("b", type=Path, help="eval output directory of model B")
    ap.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    args = ap.parse_args()
    r = paired(load(args.a), load(args.b))
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"questions in both: {r['n']}")
    print(f"mean   A {r['mean_a']:.3g}   B {r['mean_b']:.3g}   A - B {r['mean_diff_a_minus_b']:.3g} "
          f"± {r['paired_sem']:.2g} (paired standard error)")
    print(f"median A {r['median_a']:.3g}   B {r['median_b']:.3g}")
    print(f"lower on: A {r['a_lower']}, B {r['b_lower']}, ties {r['ties']} (sign test p = {r['sign_test_p']:.2g})")
    print(f"share of the mean in the largest 1 / 5 questions: A {r['top1_share_a']:.2f} / {r['top5_share_a']:.2f}, "
          f"B {r['top1_share_b']:.2f} / {r['top5_share_b']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
