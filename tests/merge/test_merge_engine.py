"""The merge engine on tiny random Qwen2 models: in-process against float64 references, then on a Ray pool."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from merge_zoo import Zoo, file_bytes, load_model, merge_in_process, reference_merge, save_tensors
from transformers import AutoModelForCausalLM

import imm_ray
from actors.merging import merge_models
from imm_ray.merge import masks
from imm_ray.merge.errors import MergeError
from imm_ray.merge.methods import METHODS, layer_of
from imm_ray.merge.options import MergeOptions
from imm_ray.merge.record import MergeRecord


def _options(zoo: Zoo, out: Path, **changes: object) -> MergeOptions:
    fields: dict[str, object] = dict(base=zoo.base, finetuned=(zoo.ft,), out=out, alpha=0.5, drop_rate=0.2, seed=3)
    return MergeOptions(**{**fields, **changes})


def _reference(options: MergeOptions, name: str, scales: dict[int, float] | None = None) -> torch.Tensor:
    models = [load_model(path) for path in (options.base, options.previous_model, *options.finetuned)]
    base, previous, *finetuned = (model[name].double() for model in models)
    p = 0.0 if options.excludes(name) else options.drop_rate
    keep = [torch.from_numpy(masks.keep_mask(masks.MaskKey(options.seed, options.iteration, name, index), p, 0,
                                             base.numel())).reshape(base.shape) for index in range(len(finetuned))]
    weight = (scales or {}).get(layer_of(name), 1.0)
    return reference_merge(options.method, base, previous, finetuned, keep, drop_rate=p, alpha=options.alpha,
                           weight=weight)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_matches_a_float64_reference(zoo: Zoo, tmp_path: Path, method: str) -> None:
    spec = METHODS[method]
    finetuned = (zoo.ft,) if spec.max_models == 1 else (zoo.ft, zoo.ft2)
    importance = None
    if spec.needs_importance:
        importance = tmp_path / "importance.csv"
        importance.write_text("layer,importance\n0,1.0\n1,3.0\n")
    options = _options(zoo, tmp_path / "out", method=method, finetuned=finetuned, previous=zoo.previous,
                       iteration=1, drop_rate=0.3 if spec.uses_drop_rate else 0.0, alpha=0.4, importance=importance)
    merged = load_model(merge_in_process(options))
    assert set(merged) == set(load_model(zoo.base))
    scales = {0: 0.5, 1: 1.5} if importance else None
    for name, tensor in merged.items():
        expected = _reference(options, name, scales)
        assert torch.allclose(tensor.double(), expected, rtol=1e-5, atol=1e-6), name


def test_bytes_do_not_depend_on_chunks_batches_or_order(zoo: Zoo, tmp_path: Path) -> None:
    outputs = [
        merge_in_process(_options(zoo, tmp_path / "default")),
        merge_in_process(_options(zoo, tmp_path / "odd", chunk_elements=7), unit_elements=1001),
        merge_in_process(_options(zoo, tmp_path / "reversed", chunk_elements=4096), reverse=True),
    ]
    first = file_bytes(outputs[0])
    for other in outputs[1:]:
        assert file_bytes(other) == first


def test_drop_rate_zero_is_plain_interpolation(zoo: Zoo, tmp_path: Path) -> None:
    merged = load_model(merge_in_process(_options(zoo, tmp_path / "imm", drop_rate=0.0, alpha=0.3)))
    linear = load_model(merge_in_process(_options(zoo, tmp_path / "linear", method="linear", drop_rate=0.0,
                                                  alpha=0.3)))
    base, ft = load_model(zoo.base), load_model(zoo.ft)
    for name, tensor in merged.items():
        expected = 0.3 * base[name].double() + 0.7 * ft[name].double()
        assert torch.allclose(tensor.double(), expected, rtol=1e-6, atol=1e-7), name
        assert torch.equal(tensor, linear[name]), name


@pytest.mark.parametrize("pair", ["fp32", "bf16"])
def test_alpha_one_returns_the_base_exactly(zoo: Zoo, tmp_path: Path, pair: str) -> None:
    base, ft = (zoo.base, zoo.ft) if pair == "fp32" else (zoo.bf16_base, zoo.bf16_ft)
    merged = load_model(merge_in_process(_options(zoo, tmp_path / "out", base=base, finetuned=(ft,), alpha=1.0)))
    expected = load_model(base)
    for name, tensor in merged.items():
        assert tensor.dtype == expected[name].dtype
        assert torch.equal(tensor, expected[name]), name


def test_other_seed_or_iteration_gives_other_masks(zoo: Zoo, tmp_path: Path) -> None:
    first = load_model(merge_in_process(_options(zoo, tmp_path / "a", seed=3)))
    for name, changes in {"seed": {"seed": 4}, "iteration": {"iteration": 1}}.items():
        other = load_model(merge_in_process(_options(zoo, tmp_path / name, **changes)))
        for tensor_name, tensor in first.items():
            assert not torch.equal(tensor, other[tensor_name]), (name, tensor_name)


def test_excluded_tensors_take_their_full_delta(zoo: Zoo, tmp_path: Path) -> None:
    options = _options(zoo, tmp_path / "out", exclude=r"norm|embed")
    merged = load_model(merge_in_process(options))
    base, ft = load_model(zoo.base), load_model(zoo.ft)
    excluded = [name for name in merged if options.excludes(name)]
    assert "model.embed_tokens.weight" in excluded and "model.norm.weight" in excluded
    for name, tensor in merged.items():
        interpolated = 0.5 * base[name].double() + 0.5 * ft[name].double()
        close = torch.allclose(tensor.double(), interpolated, rtol=1e-6, atol=1e-7)
        assert close == (name in excluded), name


def test_bf16_in_bf16_out_and_dtype_override(zoo: Zoo, tmp_path: Path) -> None:
    options = _options(zoo, tmp_path / "auto", base=zoo.bf16_base, finetuned=(zoo.bf16_ft,))
    auto = load_model(merge_in_process(options))
    wide_options = _options(zoo, tmp_path / "wide", base=zoo.bf16_base, finetuned=(zoo.bf16_ft,), dtype="float32")
    wide = load_model(merge_in_process(wide_options))
    for name, tensor in auto.items():
        assert tensor.dtype == torch.bfloat16 and wide[name].dtype == torch.float32
        expected = _reference(options, name)
        assert torch.allclose(wide[name].double(), expected, rtol=1e-6, atol=1e-7), name
        assert torch.equal(tensor, wide[name].to(torch.bfloat16)), name  # one rounding, from float32


# ---- the Ray actor pool -------------------------------------------------------------------------------------


def test_files_are_identical_for_1_2_and_4_workers(zoo: Zoo, tmp_path: Path, ray_cluster) -> None:
    records, outputs = [], []
    for workers in (1, 2, 4):
        options = _options(zoo, tmp_path / f"w{workers}", finetuned=(zoo.sharded_ft,), workers=workers)
        records.append(merge_models(options))
        outputs.append(file_bytes(options.out))
    assert [record.workers for record in records] == [1, 2, 4]
    assert outputs[0] == outputs[1] == outputs[2]
    here = file_bytes(merge_in_process(_options(zoo, tmp_path / "here", finetuned=(zoo.sharded_ft,))))
    assert {name: data for name, data in outputs[0].items() if name.endswith(".safetensors")} == here


def _tied_stored_twice(zoo: Zoo, folder: Path) -> tuple[Path, Path]:
    """A tied pair whose files store lm_head.weight as well (as some exporters do)."""
    tensors = load_model(zoo.base)
    both = {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()}
    base = save_tensors(folder / "base", both, zoo.base)
    ft = save_tensors(folder / "ft", {**load_model(zoo.ft), "lm_head.weight": both["lm_head.weight"] + 1}, zoo.base)
    for name in ("generation_config.json", "tokenizer_config.json"):
        (base / name).write_bytes((zoo.base / name).read_bytes())
    return base, ft


@pytest.mark.parametrize("pair", ["tied", "untied"])
def test_output_is_a_loadable_hf_folder_with_a_record(zoo: Zoo, tmp_path: Path, ray_cluster, pair: str) -> None:
    base, ft = _tied_stored_twice(zoo, tmp_path) if pair == "tied" else (zoo.untied_base, zoo.untied_ft)
    options = _options(zoo, tmp_path / "nested" / "out", base=base, finetuned=(ft,), iteration=2, seed=11, workers=2)
    record = merge_models(options)
    out = options.out
    assert {"config.json", "generation_config.json", "tokenizer_config.json", "model.safetensors.index.json",
            "merge_record.json"} <= {p.name for p in out.iterdir()}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    stored = set(load_model(out))
    assert set(index["weight_map"]) == stored
    assert ("lm_head.weight" in stored) == (pair == "untied")  # a tied weight is written once
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (pair == "tied")
    logits = model(torch.tensor([[1, 5, 9, 2]])).logits
    assert bool(torch.isfinite(logits).all())
    assert record == MergeRecord.read(out)
    assert (record.method, record.alpha, record.drop_rate, record.seed, record.iteration) == ("imm", 0.5, 0.2, 11, 2)
    assert record.version == imm_ray.__version__
    assert [i.role for i in record.inputs] == ["base", "finetuned[0]"]
    assert [i.path for i in record.inputs] == [str(base.resolve()), str(ft.resolve())]
    assert all(len(i.fingerprint) == 64 for i in record.inputs)
    assert record.mask is not None and record.mask.effective_drop_rate == 13107 / 65536


def _poisoned(zoo: Zoo, folder: Path, value: float) -> Path:
    tensors = load_model(zoo.ft)
    tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = value
    return save_tensors(folder, tensors, zoo.ft)


def _truncated(zoo: Zoo, folder: Path) -> Path:
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((zoo.ft / "model.safetensors").read_bytes()[:-64])
    return folder


def _corrupt(zoo: Zoo, folder: Path) -> Path:
    folder.mkdir()
    data = bytearray((zoo.ft / "model.safetensors").read_bytes())
    data[8:20] = b"#" * 12
    (folder / "model.safetensors").write_bytes(bytes(data))
    return folder


def _renamed(zoo: Zoo, folder: Path) -> Path:
    tensors = load_model(zoo.ft)
    tensors["model.norm.scale"] = tensors.pop("model.norm.weight")
    return save_tensors(folder, tensors, zoo.ft)


def _reshaped(zoo: Zoo, folder: Path) -> Path:
    return save_tensors(folder, {**load_model(zoo.ft), "model.norm.weight": torch.ones(63)}, zoo.ft)


def _retyped(zoo: Zoo, folder: Path) -> Path:
    return save_tensors(folder, {**load_model(zoo.ft), "model.norm.weight": torch.ones(64, dtype=torch.float16)},
                        zoo.ft)


SAFETY_CASES = {
    "nan input": (lambda zoo, folder: _poisoned(zoo, folder, float("nan")), {},
                  r"'model.layers.1.mlp.up_proj.weight': finetuned\[0\] .* contains NaN or Inf"),
    "inf produced": (lambda zoo, folder: _poisoned(zoo, folder, 1e6), {"dtype": "float16", "alpha": 0.0,
                                                                        "drop_rate": 0.0},
                     r"'model.layers.1.mlp.up_proj.weight': the merge produced NaN or Inf at element 196"),
    "truncated": (_truncated, {}, r"model.safetensors: truncated safetensors file"),
    "corrupt": (_corrupt, {}, r"model.safetensors: corrupt safetensors header"),
    "names": (_renamed, {}, r"'model.norm.weight' is in base .* but not in finetuned\[0\]"),
    "shapes": (_reshaped, {}, r"'model.norm.weight': shape \(64,\) in base"),
    "dtypes": (_retyped, {}, r"'model.norm.weight': dtype F32 in base .* but F16 in finetuned\[0\]"),
}


EARLY_CASES = ("truncated", "corrupt", "names", "shapes", "dtypes")  # caught before Ray or any output exists


def _assert_fails_leaving_existing_untouched(options: MergeOptions, message: str, tmp_path: Path) -> None:
    existing = options.out
    existing.mkdir()
    (existing / "model.safetensors").write_bytes(b"old model")
    with pytest.raises(MergeError, match=message):
        merge_models(options)
    assert [p.name for p in existing.iterdir()] == ["model.safetensors"]
    assert (existing / "model.safetensors").read_bytes() == b"old model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", existing.name]  # no staging folder left


@pytest.mark.parametrize("case", EARLY_CASES)
def test_bad_inputs_fail_before_any_output_exists(zoo: Zoo, tmp_path: Path, case: str) -> None:
    make, changes, message = SAFETY_CASES[case]
    bad = make(zoo, tmp_path / "bad")
    with pytest.raises(MergeError, match=message):
        merge_models(_options(zoo, tmp_path / "runs" / "iter_0" / "merge", finetuned=(bad,), **changes))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]
    _assert_fails_leaving_existing_untouched(_options(zoo, tmp_path / "existing", finetuned=(bad,), overwrite=True,
                                                      **changes), message, tmp_path)


@pytest.mark.parametrize("case", ["nan input", "inf produced"])
def test_non_finite_values_are_named_by_the_engine(zoo: Zoo, tmp_path: Path, case: str) -> None:
    make, changes, message = SAFETY_CASES[case]
    with pytest.raises(MergeError, match=message):
        merge_in_process(_options(zoo, tmp_path / "out", finetuned=(make(zoo, tmp_path / "bad"),), **changes))


def test_an_error_in_a_worker_leaves_no_trace(zoo: Zoo, tmp_path: Path, ray_cluster) -> None:
    make, changes, message = SAFETY_CASES["nan input"]
    bad = make(zoo, tmp_path / "bad")
    _assert_fails_leaving_existing_untouched(_options(zoo, tmp_path / "existing", finetuned=(bad,), overwrite=True,
                                                      workers=2, **changes), message, tmp_path)


def test_existing_output_without_overwrite_is_refused(zoo: Zoo, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(MergeError, match="already exists; pass --overwrite"):
        merge_models(_options(zoo, out))
    assert list(out.iterdir()) == []


def test_importance_must_cover_the_model_layers(zoo: Zoo, tmp_path: Path) -> None:
    csv = tmp_path / "importance.csv"
    csv.write_text("layer,importance\n0,1.0\n1,2.0\n2,1.0\n")
    options = _options(zoo, tmp_path / "out", method="iimm", importance=csv)
    with pytest.raises(MergeError, match="do not match the model's 2 layers .*layer 2"):
        merge_in_process(options)


def test_masks_keep_the_requested_share_in_a_real_merge(zoo: Zoo, tmp_path: Path) -> None:
    merged = load_model(merge_in_process(_options(zoo, tmp_path / "out", drop_rate=0.5, alpha=0.0)))
    base = load_model(zoo.base)
    dropped = [float(np.mean((merged[n] == base[n]).numpy())) for n in merged if merged[n].numel() > 4000]
    assert all(abs(share - 0.5) < 0.05 for share in dropped)


# ---- local processes (no Ray) ---------------------------------------------------------------------------------


def test_local_backend_gives_the_ray_bytes_for_any_worker_count(zoo: Zoo, tmp_path: Path, ray_cluster) -> None:
    """The same engine code in this process (1 worker) or local processes (2, 3) as on Ray actors (2)."""
    ray_out = tmp_path / "ray"
    merge_models(_options(zoo, ray_out, finetuned=(zoo.sharded_ft,), workers=2), backend="ray")
    expected = {name: data for name, data in file_bytes(ray_out).items() if name != "merge_record.json"}
    for workers in (1, 2, 3):
        out = tmp_path / f"local{workers}"
        record = merge_models(_options(zoo, out, finetuned=(zoo.sharded_ft,), workers=workers), backend="local")
        assert record.workers == workers
        assert {name: data for name, data in file_bytes(out).items() if name != "merge_record.json"} == expected


def test_auto_backend_takes_ray_only_where_it_runs_or_is_addressed(monkeypatch: pytest.MonkeyPatch) -> None:
    from actors import merging

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(merging.ray, "is_initialized", lambda: False)
    assert merging.choose_backend("auto") == "local"
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert merging.choose_backend("auto") == "ray"
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr(merging.ray, "is_initialized", lambda: True)
    assert merging.choose_backend("auto") == "ray"
    assert merging.choose_backend("local") == "local"


def test_an_error_in_a_local_worker_leaves_no_trace(zoo: Zoo, tmp_path: Path) -> None:
    make, changes, message = SAFETY_CASES["nan input"]
    bad = make(zoo, tmp_path / "bad")
    out = tmp_path / "out"
    with pytest.raises(MergeError, match=message):
        merge_models(_options(zoo, out, finetuned=(bad,), workers=2, **changes), backend="local")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name not in ("bad",)]


@pytest.mark.parametrize("backend, workers", [("local", 1), ("local", 2), ("ray", 2)])
def test_progress_counts_every_tensor_once(zoo: Zoo, tmp_path: Path, ray_cluster, backend: str,
                                           workers: int) -> None:
    ticks = []
    options = _options(zoo, tmp_path / "out", finetuned=(zoo.sharded_ft,), workers=workers, chunk_elements=64)
    merge_models(options, backend=backend, progress=ticks.append)
    stored = len(load_model(options.out))
    assert ticks[0].done == 0 and ticks[-1].done == ticks[-1].total == stored
    assert [t.done for t in ticks] == sorted(t.done for t in ticks) and {t.unit for t in ticks} == {"tensors"}
