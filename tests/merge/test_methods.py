"""The method functions and the DARE masks, on in-memory tensors (no files, no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from merge_zoo import reference_merge

from imm_ray.merge import masks
from imm_ray.merge.errors import MergeError
from imm_ray.merge.methods import (
    METHODS,
    dare,
    interpolate,
    layer_of,
    layer_scales,
    magnitude_floor,
    merge_chunk,
    read_layer_importance,
    sign_elected_mean,
)

KEY = masks.MaskKey(seed=7, iteration=2, name="model.layers.0.mlp.up_proj.weight")


def test_mask_is_the_same_whatever_the_chunking() -> None:
    whole = masks.keep_mask(KEY, 0.3, 0, 10_001)
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.choice(np.arange(1, 10_001), size=40, replace=False))
    stream = masks.KeepMaskStream(KEY, 0.3)
    pieces = [stream.take(int(n)) for n in np.diff(np.concatenate([[0], cuts, [10_001]]))]
    assert np.array_equal(np.concatenate(pieces), whole)
    for start, stop in [(1, 2), (3, 9), (4, 4), (5, 10_001), (9_997, 10_001)]:
        assert np.array_equal(masks.keep_mask(KEY, 0.3, start, stop), whole[start:stop])


@pytest.mark.parametrize("change", [{"seed": 8}, {"iteration": 3}, {"name": "model.norm.weight"}, {"model_index": 1}])
def test_mask_depends_on_seed_iteration_name_and_model(change: dict) -> None:
    other = masks.MaskKey(**{**KEY.__dict__, **change})
    assert not np.array_equal(masks.keep_mask(KEY, 0.5, 0, 4096), masks.keep_mask(other, 0.5, 0, 4096))


def test_mask_drop_share_and_resolution() -> None:
    kept = masks.keep_mask(KEY, 0.2, 0, 1_000_000).mean()
    assert abs((1 - kept) - 0.2) < 0.002
    assert masks.effective_drop_rate(0.5) == 0.5
    assert masks.effective_drop_rate(0.2) == 13107 / 65536
    assert masks.keep_mask(KEY, 0.0, 0, 1000).all()


def test_dare_rescales_kept_entries_by_exactly_one_over_one_minus_p() -> None:
    delta = torch.randn(1000)
    keep = torch.from_numpy(masks.keep_mask(KEY, 0.3, 0, 1000))
    out = dare(delta.clone(), keep, 0.3)
    assert torch.equal(out[keep == 0], torch.zeros(int((keep == 0).sum())))
    assert torch.equal(out[keep == 1], delta[keep == 1] * (1 / (1 - 0.3)))
    assert torch.equal(dare(delta.clone(), None, 0.3), delta)


def test_interpolate_alpha_one_is_the_base_and_alpha_zero_the_model() -> None:
    base, previous, delta = torch.randn(3, 500).unbind()
    assert torch.equal(interpolate(base, previous, delta.clone(), 1.0), base)
    assert torch.equal(interpolate(base, previous, delta.clone(), 0.0), previous + delta)


def test_magnitude_floor_is_the_exact_kth_largest_over_chunks() -> None:
    values = torch.randn(10_007) * torch.logspace(-6, 2, 10_007)
    for p in (0.1, 0.5, 0.93):
        keep = 10_007 - round(p * 10_007)
        expected = values.double().abs().sort(descending=True).values[keep - 1]
        floor = magnitude_floor(lambda: values.split(333), p, values.numel())
        assert floor == float(expected)
        assert int((values.abs() >= floor).sum()) == keep
    assert magnitude_floor(lambda: values.split(333), 0.0, values.numel()) is None


def test_sign_elected_mean_against_a_plain_reference() -> None:
    deltas = [torch.randn(2000) * (torch.rand(2000) > 0.3) for _ in range(3)]
    stacked = torch.stack(deltas).double()
    elected = stacked.sum(0).sign()
    agree = (stacked.sign() == elected) & (stacked != 0)
    expected = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
    assert torch.allclose(sign_elected_mean(deltas).double(), expected, atol=1e-6)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_against_a_float64_reference(name: str) -> None:
    method = METHODS[name]
    models = max(method.min_models, 2 if method.max_models is None else 1)
    generator = torch.Generator().manual_seed(1)
    base, previous = torch.randn(2, 4096, generator=generator).unbind()
    finetuned = [previous + 0.1 * torch.randn(4096, generator=generator) for _ in range(models)]
    p = 0.3 if method.uses_drop_rate else 0.0
    keep = [torch.from_numpy(masks.keep_mask(masks.MaskKey(1, 0, "w", i), p, 0, 4096)) for i in range(models)]
    floors = [magnitude_floor(lambda f=f: [f - previous], p, 4096) for f in finetuned]
    weight = 1.5 if method.needs_importance else 1.0  # the engine passes IIMM's layer scale, 1 otherwise
    out = merge_chunk(method, base, previous, finetuned, alpha=0.4, drop_rate=p, keep=keep, floors=floors,
                      weight=weight)
    expected = reference_merge(name, base, previous, finetuned, keep, drop_rate=p, alpha=0.4, weight=weight)
    assert torch.allclose(out.double(), expected, rtol=1e-6, atol=1e-6)


def test_layer_scales_average_to_one(tmp_path: Path) -> None:
    csv = tmp_path / "importance.csv"
    csv.write_text("layer,importance\n0,1.0\n1,3.0\n")
    scales = layer_scales(read_layer_importance(csv))
    assert scales == {0: 0.5, 1: 1.5}
    assert layer_of("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_of("model.embed_tokens.weight") is None


@pytest.mark.parametrize("text", ["layer,score\n0,1\n", "layer,importance\n0,-1\n", "layer,importance\nx,1\n",
                                  "layer,importance\n0,0\n1,0\n", "layer,importance\n0,1\n0,2\n"])
def test_bad_importance_files_name_the_file(tmp_path: Path, text: str) -> None:
    csv = tmp_path / "importance.csv"
    csv.write_text(text)
    with pytest.raises(MergeError, match="importance.csv"):
        read_layer_importance(csv)


def test_weight_is_applied_only_to_the_delta() -> None:
    base, previous, delta = torch.ones(4), torch.full((4,), 2.0), torch.full((4,), 4.0)
    out = interpolate(base, previous, delta.clone(), 0.5, weight=0.5)
    assert torch.equal(out, torch.full((4,), 0.5 * 1 + 0.5 * (2 + 2)))
