"""weight_change against an in-memory computation; sharded, mixed-dtype and mismatched checkpoints; outputs."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import save_tiny_model
from safetensors.torch import load_file, save_file

from imm_ray import analysis
from imm_ray.analysis import AnalysisError, plot_layers, weight_change, write_layer_csv

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def projection_weight(name: str) -> bool:
    """``...<projection>.weight``: a linear weight matrix of a Qwen2 decoder layer (not its bias)."""
    *_, module, kind = name.split(".")
    return module in PROJECTIONS and kind == "weight"


def in_memory(before: Path, after: Path, layers: int = 3) -> list[float]:
    """Load both state dicts whole and sum the Frobenius norms of the named projections, in float64."""
    sd_before, sd_after = load_file(before / "model.safetensors"), load_file(after / "model.safetensors")
    totals = []
    for n in range(layers):
        names = [k for k in sd_before if k.startswith(f"model.layers.{n}.") and projection_weight(k)]
        assert len(names) == 7
        totals.append(sum(float(torch.linalg.matrix_norm(sd_after[k].double() - sd_before[k].double())) for k in names))
    return totals


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wc")
    return {
        "before": save_tiny_model(root / "before", seed=0),
        "after": save_tiny_model(root / "after", seed=1),
        "before_sharded": save_tiny_model(root / "before_sharded", seed=0, max_shard_size="20KB"),
        "after_sharded": save_tiny_model(root / "after_sharded", seed=1, max_shard_size="20KB"),
    }


def test_matches_in_memory_computation(models):
    df = weight_change(models["before"], models["after"])
    assert list(df.columns) == ["layer", "weight_change"]
    assert df["layer"].tolist() == [0, 1, 2] and df["layer"].dtype == np.int64
    np.testing.assert_allclose(df["weight_change"], in_memory(models["before"], models["after"]), rtol=1e-12)


def test_identical_checkpoints_have_no_change(models):
    assert weight_change(models["before"], models["before_sharded"])["weight_change"].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("pair", [("before_sharded", "after_sharded"), ("before", "after_sharded")])
def test_sharded_checkpoints_give_the_same_result(models, pair):
    assert len(list(models["after_sharded"].glob("model-*.safetensors"))) > 1
    expected = weight_change(models["before"], models["after"])
    np.testing.assert_allclose(weight_change(models[pair[0]], models[pair[1]]), expected, rtol=1e-12)


def test_row_blocks_stream_large_matrices(models, monkeypatch):
    """With blocks of a few rows, the accumulated norm is the same as in one piece."""
    expected = weight_change(models["before"], models["after"])["weight_change"]
    monkeypatch.setattr(analysis, "BLOCK_ELEMENTS", 50)
    assert list(analysis._row_blocks((10, 32))) == [(0, 1), (1, 2)] + [(n, n + 1) for n in range(2, 10)]
    np.testing.assert_allclose(weight_change(models["before"], models["after"])["weight_change"], expected, rtol=1e-12)


def test_dtypes_may_differ(models, tmp_path):
    """A bf16 checkpoint against a float32 one: differences are taken in float64 of the stored values."""
    bf16 = shutil.copytree(models["after"], tmp_path / "bf16")
    tensors = load_file(bf16 / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, bf16 / "model.safetensors", {"format": "pt"})
    got = weight_change(models["before"], bf16)["weight_change"]
    np.testing.assert_allclose(got, in_memory(models["before"], bf16), rtol=1e-12)
    assert not np.allclose(got, in_memory(models["before"], models["after"]), rtol=1e-6)


def test_norms_and_biases_do_not_count(models, tmp_path):
    """Changing only 1-D parameters (norm weights, q/k/v biases) leaves the weight change at zero."""
    changed = shutil.copytree(models["before"], tmp_path / "changed")
    tensors = load_file(changed / "model.safetensors")
    save_file({k: v + 1 if v.dim() == 1 else v for k, v in tensors.items()}, changed / "model.safetensors")
    assert weight_change(models["before"], changed)["weight_change"].tolist() == [0.0, 0.0, 0.0]


def test_a_renamed_tensor_is_named(models, tmp_path):
    renamed = shutil.copytree(models["after"], tmp_path / "renamed")
    tensors = load_file(renamed / "model.safetensors")
    tensors["model.layers.1.mlp.up_projection.weight"] = tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, renamed / "model.safetensors")
    with pytest.raises(AnalysisError, match=r"model\.layers\.1\.mlp\.up_proj(ection)?\.weight .* not in"):
        weight_change(models["before"], renamed)


def test_a_shape_mismatch_names_tensor_and_shapes(models, tmp_path):
    wider = save_tiny_model(tmp_path / "wider", seed=1, intermediate=64)
    with pytest.raises(AnalysisError, match=r"tensor model\.layers\.\d\.mlp\.\w+_proj\.weight: shape \[\d+, \d+\]"):
        weight_change(models["before"], wider)


def test_a_different_layer_count_is_refused(models, tmp_path):
    deeper = save_tiny_model(tmp_path / "deeper", seed=1, layers=4)
    with pytest.raises(AnalysisError, match=r"model\.layers\.3\..* not in .*before"):
        weight_change(models["before"], deeper)


def test_pickle_only_folder_is_refused_without_unpickling(models, tmp_path):
    sentinel = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Trap()))
    with pytest.raises(AnalysisError, match=rf"{folder}.*pytorch_model\.bin.*never unpickles"):
        weight_change(models["before"], folder)
    assert not sentinel.exists()


def test_missing_folder_and_missing_shard_are_named(models, tmp_path):
    with pytest.raises(FileNotFoundError, match="absent"):
        weight_change(tmp_path / "absent", models["after"])
    broken = shutil.copytree(models["after_sharded"], tmp_path / "broken")
    shard = json.loads((broken / analysis.INDEX_FILE).read_text())["weight_map"]["model.layers.0.mlp.up_proj.weight"]
    (broken / shard).unlink()
    with pytest.raises(AnalysisError, match=rf"names shard {shard}, which is missing"):
        weight_change(models["before"], broken)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnalysisError, match=r"holds no \*\.safetensors"):
        weight_change(models["before"], tmp_path / "empty")


def test_csv_round_trips_with_integer_layers(tmp_path):
    df = pd.DataFrame({"layer": pd.Series([0, 1, 2], dtype="int64"), "importance": [0.5, 0.25, 0.125]})
    path = write_layer_csv(df, tmp_path / "out" / "importance.csv")
    assert path.read_text().splitlines()[0] == "layer,importance"
    back = pd.read_csv(path)
    assert back["layer"].dtype == np.int64
    pd.testing.assert_frame_equal(back, df)
    assert [p.name for p in path.parent.iterdir()] == ["importance.csv"]  # no temporary file left behind
    with pytest.raises(AnalysisError, match="integer 'layer'"):
        write_layer_csv(df.assign(layer=[0.0, 1.0, 2.0]), tmp_path / "bad.csv")


def test_plot_is_a_png_bar_per_layer(tmp_path):
    df = pd.DataFrame({"layer": pd.Series(range(24), dtype="int64"), "weight_change": np.linspace(1, 3, 24)})
    path = plot_layers(df, "weight_change", tmp_path / "plots" / "weight_change.png", "Layer weight change")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(path).shape
    assert width > height > 100
    with pytest.raises(AnalysisError, match="no column 'importance'"):
        plot_layers(df, "importance", tmp_path / "x.png", "x")
