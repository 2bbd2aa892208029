"""Task-adapter datasets and their exact-match evaluation.

Each task maps a word of WORD_LEN distinct lowercase letters to an answer. Words are spelled letter
by letter with spaces, because the tokenizer (`training.data`) makes every " x" / " X" a single token,
so a task is a token-level mapping. Prompt format (BOS first, EOS after the answer):

    upper:    "upper: w o r d ="    ->  " W O R D"    (uppercase each letter)
    lower:    "lower: W O R D ="    ->  " w o r d"    (lowercase each letter)
    shift:    "shift: w o r d ="    ->  " x p s e"    (Caesar cipher: each letter to the next, z -> a)
    reverse:  "reverse: w o r d ="  ->  " d r o w"    (letters in reverse order)

What was measured on the demo student (2 x 128, a few hundred pretraining steps), rank-16 LoRA:

- a fixed word length matters: answer letter j then sits a constant distance after input letter j,
  so one attention head with a fixed relative offset does the copying. Lengths 3-6 (a content-based
  "induction" copy the short-trained base has not learned) stayed at 0%.
- the adapter must also target ``lm_head``: the unembedding rows of rare tokens such as " Q" are
  barely trained, and with the head frozen the loss on the answer letters stayed above uniform
  (about 5 nats after 400 steps). With lm_head in the targets: upper 87% after 1500 steps, 95% after
  2500 (batch 32, LR 5e-3).
- shift reached 60% and reverse ~5% in the same budget (reverse needs a different offset for every
  answer position), so the demo zoo ships upper and lower.

Train and test words are disjoint: a word is a test word when sha1(word) mod 5 == 0, so the exact-match
accuracy is measured on words the adapter never saw. Evaluation is greedy generation with
`models.generate`, cut at EOS, compared with the answer after stripping spaces at both ends.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.generate import SamplingConfig, generate
from models.tokenizer import TextTokenizer

WORD_LEN = 4
_SHIFT = str.maketrans(string.ascii_lowercase, string.ascii_lowercase[1:] + "a")
# task -> (how the word is shown in the prompt, the answer), both from a lowercase word.
TRANSFORMS: dict[str, tuple[Callable[[str], str], Callable[[str], str]]] = {
    "upper": (str, str.upper),
    "lower": (str.upper, str),
    "shift": (str, lambda w: w.translate(_SHIFT)),
    "reverse": (str, lambda w: w[::-1]),
}


@dataclass
class Example:
    prompt: str
    answer: str


def is_test_word(word: str) -> bool:
    return int(hashlib.sha1(word.encode()).hexdigest(), 16) % 5 == 0


def make_examples(task: str, n: int, split: str, seed: int) -> list[Example]:
    """n examples of `task` from the "train" or "test" word set (distinct words, deterministic in seed)."""
    if task not in TRANSFORMS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TRANSFORMS)}")
    rng = random.Random(f"{task}/{split}/{seed}")
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n:
        word = "".join(rng.sample(string.ascii_lowercase, WORD_LEN))
        if word in seen or is_test_word(word) != (split == "test"):
            continue
        seen.add(word)
        words.append(word)
    show, answer = TRANSFORMS[task]
    return [Example(f"{task}: {' '.join(show(w))} =", " " + " ".join(answer(w))) for w in words]


def encode_examples(tokenizer: TextTokenizer, examples: list[Example]) -> tuple[Tensor, Tensor]:
    """Right-padded (N, T) input ids and labels; labels are -100 on the prompt and the padding."""
    rows = []
    for ex in examples:
        prompt = tokenizer.encode(ex.prompt, add_bos=True)
        answer = tokenizer.encode(ex.answer, add_bos=False) + [tokenizer.eos_token_id]
        rows.append((prompt, answer))
    length = max(len(p) + len(a) for p, a in rows) - 1
    pad = tokenizer.tokenizer.token_to_id("<|pad|>") or 0
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, (prompt, answer) in enumerate(rows):
        seq = torch.tensor(prompt + answer)
        ids[i, : len(seq) - 1] = seq[:-1]
        labels[i, len(prompt) - 1 : len(seq) - 1] = seq[len(prompt) :]
    return ids, labels


class TaskSampler:
    """batch(step): a fixed-size random batch from the encoded training examples, deterministic in step."""

    def __init__(self, ids: Tensor, labels: Tensor, batch_size: int, seed: int) -> None:
        self.ids, self.labels, self.batch_size, self.seed = ids, labels, batch_size, seed

    def __call__(self, step: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        rows = torch.randint(0, len(self.ids), (self.batch_size,), generator=gen)
        return self.ids[rows], self.labels[rows]


@torch.no_grad()
def exact_match(model: nn.Module, tokenizer: TextTokenizer, examples: list[Example], batch_size: int = 64) -> float:
    """Fraction of examples whose greedy completion (up to EOS) equals the answer."""
    model.eval()
    correct = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [tokenizer.encode(ex.prompt, add_bos=True) for ex in chunk]
        budget = max(len(tokenizer.encode(ex.answer, add_bos=False)) for ex in chunk) + 2
        outs = generate(model, prompts, SamplingConfig(max_new_tokens=budget, eos_token_ids=(tokenizer.eos_token_id,)))
        for ex, out in zip(chunk, outs, strict=True):
            if tokenizer.eos_token_id in out:
                out = out[: out.index(tokenizer.eos_token_id)]
            correct += tokenizer.decode(out).strip() == ex.answer.strip()
    return correct / max(1, len(examples))
