"""Corpus split, tokenizer, bits per byte and the task datasets."""

import math

import pytest
import torch

from training import data, tasks
from training.evaluate import bits_per_byte


def test_split_is_deterministic_and_disjoint():
    docs = data.load_documents()
    a, b = data.split_documents(docs, 0.1), data.split_documents(docs, 0.1)
    for domain in data.DOMAINS:
        train = {d.name for d in a["train"][domain]}
        val = {d.name for d in a["val"][domain]}
        assert train and val and not train & val
        assert val == {d.name for d in b["val"][domain]}


def test_tokenizer_spells_letters_as_single_tokens_and_round_trips():
    docs = data.load_documents()[:20]
    tok = data.train_tokenizer([d.text for d in docs], 400)
    for ch in "azAZqQ":
        assert len(tok.encode(" " + ch, add_bos=False)) == 1
    text = "def f(x):\n    return x  # é"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("x")[0] == tok.bos_token_id
    lengths = data.token_byte_lengths(tok)
    ids = tok.encode(text, add_bos=False)
    assert int(lengths[ids].sum()) == len(text.encode())


def test_bits_per_byte_of_uniform_model():
    # A model with constant logits over V tokens pays log2(V) bits per token.
    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids):
            return type("Out", (), {"logits": torch.zeros(*ids.shape, 8)})()

    windows = torch.randint(0, 8, (3, 5))
    token_bytes = torch.full((8,), 2)
    assert bits_per_byte(Uniform(), windows, token_bytes) == pytest.approx(math.log2(8) / 2)


def test_sampler_is_deterministic_per_step():
    streams = {"code": torch.arange(1000), "english": torch.arange(1000, 1500)}
    s = data.BatchSampler(streams, {"code": 0.5, "english": 0.5}, batch_size=4, seq_len=8, seed=1)
    x1, y1 = s(7)
    x2, _ = s(7)
    assert torch.equal(x1, x2) and torch.equal(x1[:, 1:], y1[:, :-1])
    assert not torch.equal(s(8)[0], x1)


def test_task_examples_disjoint_and_labels_masked():
    train = tasks.make_examples("reverse", 200, "train", 0)
    test = tasks.make_examples("reverse", 50, "test", 0)
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    word = test[0].prompt.split(":")[1][:-1].replace(" ", "")
    assert len(word) == tasks.WORD_LEN and test[0].answer.replace(" ", "") == word[::-1]
    assert tasks.TRANSFORMS["shift"][1]("zab") == "abc"
    lower = tasks.make_examples("lower", 1, "test", 0)[0]
    assert lower.prompt.split(":")[1].strip(" =").isupper() and lower.answer.strip().islower()
    tok = data.train_tokenizer([d.text for d in data.load_documents()[:5]], 300)
    ids, labels = tasks.encode_examples(tok, train[:3])
    answer_tokens = tok.encode(train[0].answer, add_bos=False) + [tok.eos_token_id]
    assert labels[0][labels[0] != -100].tolist() == answer_tokens
