"""Streaming safetensors I/O, input validation, the shard plan and the staged output folder."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from merge_zoo import Zoo, load_model, save_tensors
from safetensors.torch import load_file

from imm_ray.merge.engine import read_tensor
from imm_ray.merge.errors import MergeError, PickleCheckpointError
from imm_ray.merge.tensors import (
    ChunkReader,
    ShardWriter,
    check_compatible,
    create_shards,
    fingerprint,
    open_model,
    plan_shards,
    read_header,
    staged_folder,
    tied_duplicates,
)


def test_header_and_chunk_reads_match_the_safetensors_library(zoo: Zoo) -> None:
    for folder in (zoo.base, zoo.bf16_base):
        expected = load_file(folder / "model.safetensors")
        _, infos = read_header(folder / "model.safetensors")
        assert set(infos) == set(expected)
        with ChunkReader() as reader:
            for name, tensor in expected.items():
                info = infos[name]
                assert (info.shape, info.dtype) == (tuple(tensor.shape), _code(tensor))
                flat = tensor.flatten()
                stop = min(flat.numel(), 37)
                assert torch.equal(read_tensor(reader, info, 5 % stop, stop), flat[5 % stop:stop])
                assert torch.equal(read_tensor(reader, info, 0, flat.numel()), flat)


def test_sharded_model_resolves_through_its_index(zoo: Zoo) -> None:
    model = open_model(zoo.sharded_ft, "finetuned[0]")
    assert len(model.files) > 1
    assert set(model.tensors) == set(load_model(zoo.sharded_ft))
    check_compatible(open_model(zoo.base, "base"), model)


def test_written_shards_load_with_the_safetensors_library(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.randn(7), "c": torch.arange(6, dtype=torch.int64),
               "d": torch.randn(2, 2).to(torch.float16)}
    plan = plan_shards([(name, _code(t), tuple(t.shape)) for name, t in tensors.items()], max_shard_bytes=40)
    assert len(plan.shards) > 1
    create_shards(plan, tmp_path)
    with ShardWriter(tmp_path) as writer:
        for name, tensor in tensors.items():
            flat = tensor.flatten()
            raw = flat.view(torch.uint8).numpy()
            size = tensor.element_size()
            writer.write(plan.tensors[name], 1, raw[size:])  # out of order on purpose
            writer.write(plan.tensors[name], 0, raw[:size])
    loaded = {}
    for shard in plan.shards:
        loaded.update(load_file(tmp_path / shard.file))
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)
        assert plan.tensors[name].offset % tensor.element_size() == 0


def test_shard_plan_does_not_depend_on_anything_but_the_tensors() -> None:
    entries = [(f"t{i}", "BF16", (i + 1, 64)) for i in range(20)]
    assert plan_shards(entries, 2000) == plan_shards(list(entries), 2000)


def _code(tensor: torch.Tensor) -> str:
    return {torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64", torch.float16: "F16"}[tensor.dtype]


def test_truncated_file_is_named(zoo: Zoo, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    data = (zoo.base / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(MergeError, match=r"broken/model.safetensors: truncated"):
        open_model(broken, "base")


@pytest.mark.parametrize("payload", [b"\x00" * 4, b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!", b"\xff" * 64])
def test_corrupt_file_is_named(tmp_path: Path, payload: bytes) -> None:
    (tmp_path / "model.safetensors").write_bytes(payload)
    with pytest.raises(MergeError, match=r"model.safetensors: (not a safetensors file|corrupt)"):
        open_model(tmp_path, "base")


def test_index_naming_a_missing_shard_is_named(zoo: Zoo, tmp_path: Path) -> None:
    folder = tmp_path / "sharded"
    folder.mkdir()
    for file in zoo.sharded_ft.iterdir():
        if not file.name.startswith("model-00002"):
            (folder / file.name).write_bytes(file.read_bytes())
    with pytest.raises(MergeError, match="model-00002-of-.* which is missing"):
        open_model(folder, "finetuned[0]")


class _Trap:
    """Unpickling this would create a marker file: the test proves nothing is ever unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickle_checkpoints_are_refused_unread(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    for path in (folder, folder / "pytorch_model.bin"):
        with pytest.raises(PickleCheckpointError, match="pickle checkpoints are refused.*save_pretrained"):
            open_model(path, "finetuned[0]")
    assert not marker.exists()


def test_mismatches_name_the_tensor(zoo: Zoo, tmp_path: Path) -> None:
    base = open_model(zoo.base, "base")
    tensors = load_model(zoo.base)
    cases = {
        "missing": ({k: v for k, v in tensors.items() if k != "model.norm.weight"}, "'model.norm.weight' is in base"),
        "extra": ({**tensors, "extra.weight": torch.zeros(2)}, "'extra.weight' is in finetuned"),
        "shape": ({**tensors, "model.norm.weight": torch.zeros(65)}, r"'model.norm.weight': shape \(64,\)"),
        "dtype": ({**tensors, "model.norm.weight": torch.zeros(64, dtype=torch.float16)}, "dtype F32 in base"),
    }
    for case, (changed, message) in cases.items():
        other = open_model(save_tensors(tmp_path / case, changed), "finetuned[0]")
        with pytest.raises(MergeError, match=message):
            check_compatible(base, other)


def test_tied_lm_head_stored_twice_is_written_once(zoo: Zoo, tmp_path: Path) -> None:
    tensors = load_model(zoo.base)
    twice = {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()}
    both = save_tensors(tmp_path / "both", twice, zoo.base)
    assert tied_duplicates(open_model(both, "base")) == {"lm_head.weight"}
    assert tied_duplicates(open_model(zoo.untied_base, "base")) == frozenset()


def test_fingerprint_follows_the_weights(zoo: Zoo, tmp_path: Path) -> None:
    tensors = load_model(zoo.base)
    copy = save_tensors(tmp_path / "copy", tensors, zoo.base)
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] += 1
    changed = save_tensors(tmp_path / "changed", tensors, zoo.base)
    first = fingerprint(open_model(copy, "base"))
    assert first == fingerprint(open_model(copy, "base"))
    assert first != fingerprint(open_model(changed, "base"))


def test_staged_folder_publishes_only_on_success(tmp_path: Path) -> None:
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(RuntimeError):
        with staged_folder(out, overwrite=False) as folder:
            (folder / "x").write_text("partial")
            raise RuntimeError("boom")
    assert not (tmp_path / "new").exists()
    with staged_folder(out, overwrite=False) as folder:
        (folder / "x").write_text("done")
    assert (out / "x").read_text() == "done"
    assert [p.name for p in out.parent.iterdir()] == ["out"]


def test_existing_output_is_untouched_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("old")
    with pytest.raises(MergeError, match="already exists; pass --overwrite"):
        with staged_folder(out, overwrite=False):
            pass
    with pytest.raises(RuntimeError):
        with staged_folder(out, overwrite=True) as folder:
            (folder / "keep").write_text("new")
            raise RuntimeError("boom")
    assert (out / "keep").read_text() == "old"
    with staged_folder(out, overwrite=True) as folder:
        (folder / "keep").write_text("new")
    assert (out / "keep").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_index_json_lists_every_tensor_once(tmp_path: Path) -> None:
    plan = plan_shards([("a", "F32", (4,)), ("b", "BF16", (3,))], max_shard_bytes=8)
    index = plan.index()
    assert index == {"metadata": {"total_size": 22}, "weight_map": {"a": plan.tensors["a"].file,
                                                                     "b": plan.tensors["b"].file}}
