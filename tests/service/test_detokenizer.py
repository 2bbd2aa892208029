"""The streaming detokenizer: multi-byte UTF-8 split across tokens, stop strings across tokens."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from models.tokenizer import TextTokenizer
from service.engine.detokenizer import IncrementalDetokenizer


def byte_tokenizer() -> TextTokenizer:
    """One token per byte (byte-level alphabet only): a multi-byte character always spans several tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return TextTokenizer(tokenizer, {})


def stream(text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], IncrementalDetokenizer]:
    tokenizer = byte_tokenizer()
    detok = IncrementalDetokenizer(tokenizer, stop)
    deltas = []
    for token in tokenizer.encode(text, False):
        deltas.append(detok.add(token))
        if detok.stopped:
            break
    return deltas, detok


def test_multibyte_characters_are_held_until_complete():
    text = "a€b😀c"  # 3- and 4-byte characters
    deltas, detok = stream(text)
    assert "".join(deltas) + detok.flush() == text
    assert all("\ufffd" not in d for d in deltas)  # never half a character
    assert deltas[1:3] == ["", ""] and deltas[3] == "€"  # the euro sign's first two bytes emit nothing


def test_a_stop_string_split_across_tokens_ends_the_text_before_it():
    deltas, detok = stream("hello STOP world", stop=("STOP",))
    assert detok.stopped
    assert "".join(deltas) == "hello "  # nothing of the stop string (or after it) is emitted
    assert detok.flush() == ""


def test_a_stop_prefix_is_held_back_then_released_when_it_does_not_complete():
    deltas, detok = stream("ab STx", stop=("STOP",))
    assert not detok.stopped
    assert deltas[-2] == ""  # "ST" could still become "STOP": held
    assert "".join(deltas) == "ab STx"


def test_flush_returns_a_held_prefix_at_the_end():
    deltas, detok = stream("the ST", stop=("STOP",))
    assert "".join(deltas) == "the " and detok.flush() == "ST"


def test_stop_string_with_multibyte_characters():
    deltas, detok = stream("x😀END y", stop=("😀END",))
    assert detok.stopped and "".join(deltas) == "x"


def test_each_token_decodes_a_short_window_not_the_whole_output():
    tokenizer = byte_tokenizer()
    windows: list[int] = []
    decode = tokenizer.decode

    def counting(ids):
        windows.append(len(ids))
        return decode(ids)

    tokenizer.decode = counting
    detok = IncrementalDetokenizer(tokenizer)
    text = "caf\u00e9 na\u00efve \U0001f600 " * 40  # 480+ bytes, multi-byte characters throughout
    out = "".join(detok.add(token) for token in tokenizer.encode(text, False)) + detok.flush()
    assert out == text
    assert max(windows) <= 5  # a 4-byte character spans 4 tokens: the longest window
