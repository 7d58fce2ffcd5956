"""Continued pretraining (``imm-ray toy build --init``): a few thousand tokens on top of a tiny build keep the
parent's tokenizer and shape, change its weights, record the parent, and still never train on a toy train or
test question."""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from imm_ray.cli.app import app
from imm_ray.data.prompts import RESPONSE_PREFIX
from imm_ray.data.toy import TOY_SETS, ToyMixture, in_pretraining_buckets, load_toy
from imm_ray.toy.model import ToyModelSpec
from imm_ray.toy.pretrain import RECORD_NAME, build_toy, training_documents

from test_toy_build import TINY  # the tiny build spec (tests/toy is on sys.path under pytest)


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("parent") / "toy"
    build_toy(TINY, out, show_progress=False)
    return out


@pytest.fixture(scope="module")
def child(parent: Path) -> Path:
    out = parent.parent / "child"
    mixture = ToyMixture(((TOY_SETS[0], 0.5), (TOY_SETS[1], 0.25), (TOY_SETS[2], 0.25)))
    build_toy(replace(TINY, init=str(parent), tokens=3_000, lr=1e-3, mixture=mixture), out, show_progress=False)
    return out


def test_continued_build_keeps_the_tokenizer_and_shape_and_changes_the_weights(parent: Path, child: Path) -> None:
    assert (child / "tokenizer.json").read_text() == (parent / "tokenizer.json").read_text()
    before, after = load_file(parent / "model.safetensors"), load_file(child / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(before[k].shape == after[k].shape for k in before)
    assert not all(torch.equal(before[k], after[k]) for k in before)


def test_record_names_the_parent_and_the_continued_mixture(parent: Path, child: Path) -> None:
    record = json.loads((child / RECORD_NAME).read_text())
    assert record["spec"]["init"] == str(parent) and record["spec"]["tokens"] == 3_000
    assert dict(record["spec"]["mixture"]["weights"])[TOY_SETS[0]] == 0.5
    assert record["tokens_seen"] >= 3_000 and record["stopped_by"] == "tokens"
    assert record["parent"]["folder"] == str(parent.resolve())
    assert record["parent"]["weights_sha256"] == hashlib.sha256((parent / "model.safetensors").read_bytes()).hexdigest()
    assert record["parent"]["record"] == json.loads((parent / RECORD_NAME).read_text())
    assert record["parent"]["record"]["parent"] is None  # the parent was built from scratch
    assert [a["set_name"] for a in record["accuracies"]] == list(TOY_SETS)


def test_continued_stream_is_its_own_and_never_holds_a_train_or_test_question(parent: Path) -> None:
    scratch, continued = TINY, replace(TINY, init=str(parent))
    first = list(itertools.islice(training_documents(scratch), 200))
    documents = list(itertools.islice(training_documents(continued), 3000))
    assert documents[:200] != first  # not the stream the parent already trained on
    questions = {doc[: doc.index(RESPONSE_PREFIX)].split("Instruction:\n", 1)[1].strip() for doc in documents}
    assert all(in_pretraining_buckets(q) for q in questions)
    split_questions = {
        p.question for name in TOY_SETS for split, n in (("train", 1000), ("test", 400))
        for p in load_toy(name, split, n, 0)
    }
    assert not questions & split_questions


def test_a_continued_build_refuses_another_shape_a_missing_parent_and_its_own_folder(
    parent: Path, tmp_path: Path
) -> None:
    wider = replace(TINY, init=str(parent), model=ToyModelSpec(hidden_size=96, num_layers=2, num_heads=2,
                                                                num_kv_heads=2, intermediate_size=128))
    with pytest.raises(ValueError, match="model.hidden_size"):
        build_toy(wider, tmp_path / "wider", show_progress=False)
    with pytest.raises(ValueError, match="config.json is missing"):
        build_toy(replace(TINY, init=str(tmp_path / "nowhere")), tmp_path / "x", show_progress=False)
    with pytest.raises(ValueError, match="output folder"):
        build_toy(replace(TINY, init=str(parent)), parent, overwrite=True, show_progress=False)
    assert not (tmp_path / "wider").exists() and not (tmp_path / "x").exists()


def test_cli_init_names_the_missing_parent(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["toy", "build", "--out", str(tmp_path / "x"), "--init", str(tmp_path / "no")])
    assert result.exit_code == 2 and "--init" in " ".join(result.output.split())
