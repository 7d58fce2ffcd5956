"""Model shapes from config.json alone: the paper models' published parameter counts, a folder without weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from imm_ray.memory.shapes import KNOWN_SHAPES, ModelShape, ShapeError, model_shape

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "model_configs"
TOY = Path(__file__).resolve().parents[2] / "imm_ray" / "assets" / "toy"

# Published totals: the Qwen2.5 model cards (0.49B, 1.54B, 7.61B; exact counts of the released safetensors) and
# Llama 2's 6.74B (Touvron et al. 2023).
PUBLISHED = {
    "Qwen/Qwen2.5-0.5B-Instruct": 494_032_768,
    "Qwen/Qwen2.5-1.5B-Instruct": 1_543_714_304,
    "Qwen/Qwen2.5-7B-Instruct": 7_615_616_512,
    "meta-llama/Llama-2-7b-hf": 6_738_415_616,
}


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_known_shapes_give_the_published_parameter_counts(model):
    assert ModelShape(**KNOWN_SHAPES[model]).parameters() == PUBLISHED[model]


def test_a_config_json_without_weights_is_enough():
    shape = model_shape("model.path", str(FIXTURES / "Qwen2.5-0.5B-Instruct"))
    assert shape.parameters() == PUBLISHED["Qwen/Qwen2.5-0.5B-Instruct"]
    assert (shape.kv_heads, shape.head_dim, shape.tied_embeddings, shape.qkv_bias) == (2, 64, True, True)


def test_the_toy_count_equals_its_safetensors():
    from safetensors import safe_open

    with safe_open(str(TOY / "model.safetensors"), framework="pt") as handle:
        stored = 0
        for name in handle.keys():
            size = 1
            for dim in handle.get_slice(name).get_shape():
                size *= dim
            stored += size
    assert model_shape("model.path", str(TOY)).parameters() == stored


def test_an_unknown_model_is_refused_naming_the_field(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ShapeError, match="model.teacher: nobody/not-a-model"):
        model_shape("model.teacher", "nobody/not-a-model")
