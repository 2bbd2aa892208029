"""Corpus, deterministic train/validation split, byte-level BPE tokenizer and batch sampling.

The corpus must exist on any machine with Python and need no download, so it is made of two domains
that ship with CPython itself:

- ``code``: the top-level ``*.py`` files of the standard library (``sysconfig`` "stdlib" path), one
  document per file, in sorted file-name order;
- ``english``: ``pydoc_data.topics.topics``, the plain-English help pages behind ``help("topic")``,
  one document per topic, in sorted key order.

The split is by document, not by window, so no validation text is ever seen in training: a document
is held out when ``sha1("<domain>/<name>") mod 1000 < 1000 * val_fraction``. It depends only on the
names, so it is the same on every machine with the same Python version (the stdlib differs between
versions; `corpus_fingerprint` is recorded in every model card).

The tokenizer is a byte-level BPE (GPT-2 style) trained with Hugging Face ``tokenizers`` on the
training split plus a short "alphabet primer" (each letter with a leading space, lower and upper
case, repeated) so that ``" a"`` .. ``" z"`` and ``" A"`` .. ``" Z"`` are single tokens: the task
adapters (see `training.tasks`) spell words letter by letter and rely on that.
"""

from __future__ import annotations

import hashlib
import string
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import Tensor

from models.tokenizer import TextTokenizer

DOMAINS = ("code", "english")
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
# A minimal chat format: role tags on their own line; the serving engine renders it with jinja.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ALPHABET_PRIMER = " ".join(string.ascii_lowercase + string.ascii_uppercase + string.digits) + "\n"


@dataclass
class Document:
    domain: str
    name: str
    text: str


def load_documents() -> list[Document]:
    """Both domains, in a fixed order."""
    import pydoc_data.topics

    docs: list[Document] = []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        docs.append(Document("code", path.name, path.read_text(encoding="utf-8", errors="replace")))
    for key in sorted(pydoc_data.topics.topics):
        docs.append(Document("english", key, pydoc_data.topics.topics[key]))
    return docs


def is_validation(doc: Document, val_fraction: float) -> bool:
    digest = int(hashlib.sha1(f"{doc.domain}/{doc.name}".encode()).hexdigest(), 16)
    return digest % 1000 < round(1000 * val_fraction)


def split_documents(
    docs: list[Document], val_fraction: float, train_max_chars: int | None = None
) -> dict[str, dict[str, list[Document]]]:
    """{"train"|"val": {domain: [Document]}}, deterministic by document name.

    train_max_chars caps each domain's training documents (taken in order; the tiny preset uses it).
    """
    out: dict[str, dict[str, list[Document]]] = {s: {d: [] for d in DOMAINS} for s in ("train", "val")}
    used = dict.fromkeys(DOMAINS, 0)
    for doc in docs:
        if is_validation(doc, val_fraction):
            out["val"][doc.domain].append(doc)
        elif train_max_chars is None or used[doc.domain] + len(doc.text) <= train_max_chars:
            used[doc.domain] += len(doc.text)
            out["train"][doc.domain].append(doc)
    return out


def corpus_fingerprint(docs: list[Document]) -> str:
    digest = hashlib.sha1()
    for doc in docs:
        digest.update(f"{doc.domain}/{doc.name}/{len(doc.text)}\n".encode())
    return digest.hexdigest()[:12]


def train_tokenizer(texts: list[str], vocab_size: int) -> TextTokenizer:
    """Byte-level BPE with <|bos|>, <|eos|>, <|pad|> specials; `tokenizer.json` adds BOS by its post-processor."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Each primer line adds one count to every " x" pair; this many lines put them among the top merges.
    repeats = max(500, sum(len(t) for t in texts) // 500)
    tok.train_from_iterator([*texts, ALPHABET_PRIMER * repeats], trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Transformers' tokenizer adds BOS through this post-processor; TextTokenizer adds it itself.
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bos_id)])
    config = {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": True,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    return TextTokenizer(tok, config)


def token_byte_lengths(tokenizer: TextTokenizer) -> Tensor:
    """(V,) number of UTF-8 bytes each token stands for (0 for special tokens), for bits per byte."""
    vocab = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
    specials = {tokenizer.bos_token, tokenizer.eos_token, PAD}
    lengths = torch.zeros(tokenizer.vocab_size, dtype=torch.long)
    for token, index in vocab.items():
        # Byte-level BPE: every character of a token's string stands for exactly one byte.
        lengths[index] = 0 if token in specials else len(token)
    return lengths


def encode_documents(tokenizer: TextTokenizer, docs: list[Document]) -> Tensor:
    """One stream (N,) of token ids: each document followed by EOS."""
    encodings = tokenizer.tokenizer.encode_batch([d.text for d in docs], add_special_tokens=False)
    ids: list[int] = []
    for enc in encodings:
        ids.extend(enc.ids)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


class BatchSampler:
    """Random (B, T) windows from per-domain streams; batch `step` depends only on (seed, step).

    That makes training resumable bit for bit and lets two runs (distilled student and its control,
    MoE and its dense control) see exactly the same tokens.
    """

    def __init__(
        self, streams: dict[str, Tensor], weights: dict[str, float], batch_size: int, seq_len: int, seed: int
    ) -> None:
        self.domains = [d for d in streams if weights.get(d, 0) > 0]
        self.streams = streams
        self.probs = torch.tensor([weights[d] for d in self.domains], dtype=torch.float)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        for d in self.domains:
            if len(streams[d]) <= seq_len + 1:
                raise ValueError(f"domain {d!r} has {len(streams[d])} tokens, fewer than seq_len+2={seq_len + 2}")

    def __call__(self, step: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        domain_of_row = torch.multinomial(self.probs, self.batch_size, replacement=True, generator=gen)  # (B,)
        rows = []
        for d in domain_of_row.tolist():
            stream = self.streams[self.domains[d]]
            start = int(torch.randint(0, len(stream) - self.seq_len - 1, (1,), generator=gen))
            rows.append(stream[start : start + self.seq_len + 1])
        window = torch.stack(rows)  # (B, T+1)
        return window[:, :-1], window[:, 1:]


def eval_windows(stream: Tensor, seq_len: int, max_tokens: int) -> Tensor:
    """Non-overlapping (N, T+1) windows from the start of a validation stream, at most max_tokens targets."""
    n = min((len(stream) - 1) // seq_len, max(1, max_tokens // seq_len))
    starts = torch.arange(n) * seq_len
    return torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])  # (N, T+1)
