"""One tokenising helper: the BOS token is added exactly where the tokenizer adds one, and never twice."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from imm_ray.tokens import IGNORE_INDEX, adds_bos, encode_pair, encode_prompt
from tiny_model import CORPUS, build_tokenizer


def llama_like_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer that, like Llama-2's, writes <s> before every text when asked for special tokens."""
    raw = Tokenizer(models.BPE(unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", raw.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="</s>")


@pytest.fixture(scope="module")
def llama():
    return llama_like_tokenizer()


def test_a_tokenizer_that_adds_bos_gets_it_once(llama):
    assert adds_bos(llama)
    ids = encode_prompt(llama, "Question: 2 + 2?")
    assert ids[0] == llama.bos_token_id and ids.count(llama.bos_token_id) == 1
    assert ids == llama("Question: 2 + 2?", add_special_tokens=True)["input_ids"]


def test_a_chat_template_that_writes_bos_as_text_is_not_given_a_second(llama):
    ids = encode_prompt(llama, "<s>[INST] Question: 2 + 2? [/INST]")
    assert ids[0] == llama.bos_token_id and ids.count(llama.bos_token_id) == 1


def test_a_tokenizer_without_bos_gets_none():
    tokenizer = build_tokenizer()
    assert not adds_bos(tokenizer)
    assert encode_prompt(tokenizer, "Question: 1") == tokenizer("Question: 1", add_special_tokens=False)["input_ids"]


def test_sft_and_importance_pairs_start_with_the_prompt_generation_sees(llama):
    prompt, response = "Question: 2 + 2?\nAnswer: ", "2 + 2 = 4. The answer is 4"
    ids, labels = encode_pair(llama, prompt, response, max_length=512)
    prompt_ids = encode_prompt(llama, prompt)
    assert ids[: len(prompt_ids)] == prompt_ids and labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert ids[-1] == llama.eos_token_id and llama.decode(labels[len(prompt_ids):]) == response + "</s>"
