"""Generates the small preference data set shipped in examples/data/ (deterministic).

    python examples/make_preference_data.py --pairs 1000 --out examples/data/reverse_pairs.jsonl

The task is one a tiny model can learn: reverse a short lower-case word. The chosen response
is the reversed word; the rejected response is a near miss (two letters swapped, a letter
replaced, or the word left as it is), so the preference carries signal at the token level.
One JSON object per line with string fields prompt, chosen and rejected.
"""

import argparse
import json
import random
import string
from pathlib import Path


def near_miss(rng: random.Random, word: str, answer: str) -> str:
    kind = rng.choice(["swap", "replace", "copy"])
    if kind == "copy" and word != answer:
        return word
    letters = list(answer)
    if kind == "swap" and len(set(letters)) > 1:
        while True:
            i, j = rng.sample(range(len(letters)), 2)
            if letters[i] != letters[j]:
                letters[i], letters[j] = letters[j], letters[i]
                return "".join(letters)
    i = rng.randrange(len(letters))
    letters[i] = rng.choice([c for c in string.ascii_lowercase if c != letters[i]])
    return "".join(letters)


def make_pairs(num_pairs: int, seed: int):
    rng = random.Random(seed)
    seen = set()
    while len(seen) < num_pairs:
        word = "".join(rng.choice(string.ascii_lowercase[:12]) for _ in range(rng.randint(3, 6)))
        if word in seen or word == word[::-1]:
            continue
        seen.add(word)
        answer = word[::-1]
        yield {"prompt": f"reverse {word}:", "chosen": answer,
               "rejected": near_miss(rng, word, answer)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="examples/data/reverse_pairs.jsonl")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for row in make_pairs(args.pairs, args.seed):
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
