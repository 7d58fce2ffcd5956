"""The toy tokenizer: one digit per token, exact round trip, loadable as a fast tokenizer with eos/pad."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from imm_ray.data.toy import pretraining_documents
from imm_ray.toy.tokenizer import EOS_TOKEN, PAD_TOKEN, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer(itertools.islice(pretraining_documents(0), 400), vocab_size=400)


def test_no_token_holds_more_than_a_bare_digit(tokenizer: PreTrainedTokenizerFast) -> None:
    vocab = tokenizer.get_vocab()
    assert len(vocab) == 400
    with_digits = [token for token in vocab if any(ch in "0123456789" for ch in token)]
    assert sorted(with_digits) == list("0123456789")


def test_numbers_split_into_digits(tokenizer: PreTrainedTokenizerFast) -> None:
    tokens = tokenizer.tokenize("Mia has 1234 apples and 50 + 7 = 57.")
    assert [t for t in tokens if t.isdigit()] == list("1234") + list("50") + ["7"] + list("57")


def test_round_trip(tokenizer: PreTrainedTokenizerFast) -> None:
    for document in itertools.islice(pretraining_documents(7), 50):
        assert tokenizer.decode(tokenizer(document)["input_ids"]) == document
    odd = "Zoë's 3rd café: 12×4 = 48!\n\n"  # characters the corpus never had still round-trip (byte level)
    assert tokenizer.decode(tokenizer(odd)["input_ids"]) == odd


def test_saved_tokenizer_loads_with_specials(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, PreTrainedTokenizerFast)
    assert (loaded.eos_token, loaded.pad_token, loaded.padding_side) == (EOS_TOKEN, PAD_TOKEN, "left")
    assert loaded.eos_token_id != loaded.pad_token_id
    text = "Ravi has 63 - 28 = 35 stamps."
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_vocab_too_small_is_rejected() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["a b c"], vocab_size=100)
