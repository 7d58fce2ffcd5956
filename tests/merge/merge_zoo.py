"""Tiny random Qwen2 models (transformers, no download) and helpers shared by the merge tests.

A module of its own (not conftest.py) so that tests import the helpers under a name unique in the suite.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from imm_ray.merge import engine, plan
from imm_ray.merge.options import MergeOptions
from imm_ray.merge.tensors import create_shards


def build_model(
    folder: Path,
    *,
    seed: int,
    parent: Path | None = None,
    tied: bool = True,
    dtype: torch.dtype = torch.float32,
    shard: str | None = None,
    noise: float = 0.02,
) -> Path:
    """A 2-layer, hidden-64 Qwen2 saved as safetensors; with ``parent``, a perturbed copy of that model."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=tied,
    )
    model = Qwen2ForCausalLM(config)
    if parent is not None:
        parent_model = Qwen2ForCausalLM.from_pretrained(parent, dtype=torch.float32)
        model.load_state_dict(parent_model.state_dict())
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * noise)
    model.to(dtype).save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64, "seed": seed}))
    return folder


@dataclass(frozen=True)
class Zoo:
    """Tied fp32 base with two fine-tunes and a 'previous' (θ^t); an untied pair; a bf16 pair; a sharded fine-tune."""

    base: Path
    ft: Path
    ft2: Path
    previous: Path
    sharded_ft: Path
    untied_base: Path
    untied_ft: Path
    bf16_base: Path
    bf16_ft: Path


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    root = tmp_path_factory.mktemp("zoo")
    base = build_model(root / "base", seed=0)
    untied_base = build_model(root / "untied_base", seed=5, tied=False)
    bf16_base = build_model(root / "bf16_base", seed=7, dtype=torch.bfloat16)
    return Zoo(
        base=base,
        ft=build_model(root / "ft", seed=1, parent=base),
        ft2=build_model(root / "ft2", seed=2, parent=base),
        previous=build_model(root / "previous", seed=3, parent=base, noise=0.01),
        sharded_ft=build_model(root / "sharded_ft", seed=1, parent=base, shard="60KB"),
        untied_base=untied_base,
        untied_ft=build_model(root / "untied_ft", seed=6, parent=untied_base, tied=False),
        bf16_base=bf16_base,
        bf16_ft=build_model(root / "bf16_ft", seed=8, parent=bf16_base, dtype=torch.bfloat16),
    )


def load_model(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder (all shards), loaded whole with the safetensors library."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def file_bytes(folder: Path) -> dict[str, bytes]:
    """The bytes of every weight file and the index, to compare outputs bit for bit."""
    names = [p for p in folder.iterdir() if p.suffix == ".safetensors" or p.name.endswith(".index.json")]
    return {p.name: p.read_bytes() for p in sorted(names)}


def merge_in_process(options: MergeOptions, unit_elements: int | None = None, reverse: bool = False) -> Path:
    """The engine without Ray: plan, write headers, run every batch here (in reverse order if asked)."""
    inputs = plan.open_inputs(options)
    options.out.mkdir(parents=True)
    merge_plan = plan.plan_merge(options, inputs, options.out)
    create_shards(merge_plan.shards, options.out)
    batches = plan.work_batches(merge_plan, unit_elements)
    for batch in reversed(batches) if reverse else batches:
        engine.run_batch(merge_plan, batch)
    return options.out


def save_tensors(folder: Path, tensors: dict[str, torch.Tensor], config_from: Path | None = None) -> Path:
    """A model folder holding exactly ``tensors`` (for hand-made broken or unusual inputs)."""
    folder.mkdir(parents=True)
    save_file({name: t.contiguous() for name, t in tensors.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    if config_from is not None:
        (folder / "config.json").write_bytes((config_from / "config.json").read_bytes())
    return folder


def reference_merge(
    method: str,
    base: torch.Tensor,
    previous: torch.Tensor,
    finetuned: list[torch.Tensor],
    keep: list[torch.Tensor],
    *,
    drop_rate: float,
    alpha: float,
    weight: float = 1.0,
) -> torch.Tensor:
    """The methods written plainly in float64 on whole tensors: the reference the engine is held to.

    ``keep`` are DARE keep-masks (1 = keep); TIES's magnitude floor is found here by sorting.
    """
    base, previous = base.double(), previous.double()
    if method == "linear":
        return alpha * base + (1 - alpha) * torch.stack([f.double() for f in finetuned]).mean(0)
    deltas = [f.double() - previous for f in finetuned]
    if method in ("imm", "iimm", "task-arithmetic", "dare-ties") and drop_rate > 0:
        deltas = [d * k.double() / (1 - drop_rate) for d, k in zip(deltas, keep)]
    if method == "ties" and drop_rate > 0:
        numel = deltas[0].numel()
        keep_count = numel - round(drop_rate * numel)
        floors = [d.abs().flatten().sort(descending=True).values[keep_count - 1] for d in deltas]
        deltas = [d * (d.abs() >= floor) for d, floor in zip(deltas, floors)]
    if method in ("ties", "dare-ties"):
        stacked = torch.stack(deltas)
        agree = (stacked.sign() == stacked.sum(0).sign()) & (stacked != 0)
        delta = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
    else:
        delta = torch.stack(deltas).sum(0)
    return alpha * base + (1 - alpha) * (previous + weight * delta)
