"""A tiny, seconds-long build: the HF folder it writes loads, is deterministic, and is written atomically.

The real build (~3M tokens) is not run here; the shipped asset is checked in test_toy_assets.py.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from typer.testing import CliRunner

from imm_ray.cli import toy as toy_cli
from imm_ray.cli.app import app
from imm_ray.data.toy import TOY_SETS, load_toy
from imm_ray.grading import grade
from imm_ray.toy.check import SamplingSpec, check_accuracy
from imm_ray.toy.model import ToyModelSpec
from imm_ray.toy import pretrain
from imm_ray.toy.pretrain import RECORD_NAME, MeasureSpec, PretrainSpec, _lr_at, _new_model, build_toy

TINY = PretrainSpec(
    tokens=4_000,
    batch_size=8,
    warmup_tokens=1_000,
    vocab_size=400,
    tokenizer_documents=200,
    eval_from_tokens=3_000,
    eval_every_tokens=100_000,
    eval_questions=2,
    model=ToyModelSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=128),
    measure=MeasureSpec(test_questions=2, train_questions=2, sampling=SamplingSpec(samples=2, max_new_tokens=4)),
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("build") / "toy"
    build_toy(TINY, out, show_progress=False)
    return out


def test_folder_loads_as_hf_model(built: Path) -> None:
    assert {p.name for p in built.iterdir()} >= {
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", RECORD_NAME
    }
    model = AutoModelForCausalLM.from_pretrained(built)
    tokenizer = AutoTokenizer.from_pretrained(built)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert model.config.model_type == "qwen2" and model.config.num_hidden_layers == 2
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    ids = tokenizer("Mia has 5 apples.", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))
    assert not list(built.parent.glob(".toy.*"))  # no staging folder left behind


def test_record_describes_the_build(built: Path) -> None:
    record = json.loads((built / RECORD_NAME).read_text())
    assert record["spec"]["seed"] == 0 and record["spec"]["tokens"] == TINY.tokens
    assert record["tokens_seen"] >= TINY.tokens and record["steps"] > 0 and record["stopped_by"] == "tokens"
    assert record["wall_seconds"] > 0 and record["evals"][0][0] >= TINY.eval_from_tokens
    assert [a["set_name"] for a in record["accuracies"]] == list(TOY_SETS)
    assert record["id_train_coverage"]["questions"] == 2
    assert record["parameters"] == sum(t.numel() for t in load_file(built / "model.safetensors").values())


def test_same_seed_same_weights(built: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    build_toy(TINY, again, show_progress=False)
    first, second = load_file(built / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert (built / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()
    other, _ = _new_model(replace(TINY, seed=1))
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(first[key], other.state_dict()[key])


def test_existing_folder_is_kept_unless_overwrite(built: Path, tmp_path: Path) -> None:
    out = tmp_path / "toy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        build_toy(TINY, out, show_progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    build_toy(replace(TINY, tokens=1_000), out, overwrite=True, show_progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert not list(tmp_path.glob(".toy*"))


def test_target_accuracy_stops_early(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pretrain, "_quick_eval", lambda model, tokenizer, spec: 0.5)
    often = replace(TINY, eval_from_tokens=1_000, eval_every_tokens=1_000)
    record = build_toy(replace(often, target_id_accuracy=0.6), tmp_path / "a", show_progress=False)
    assert record.stopped_by == "tokens" and len(record.evals) >= 3
    record = build_toy(replace(often, target_id_accuracy=0.5), tmp_path / "b", show_progress=False)
    assert record.stopped_by == "target" and record.evals == ((record.tokens_seen, 0.5),)
    assert often.eval_from_tokens <= record.tokens_seen < often.tokens


def test_lr_schedule_warms_up_then_decays() -> None:
    spec = replace(TINY, tokens=10_000, warmup_tokens=1_000, lr=1e-3, final_lr_ratio=0.1)
    assert _lr_at(spec, 0) < _lr_at(spec, 500) < _lr_at(spec, 999) <= 1e-3
    assert _lr_at(spec, 1_000) == pytest.approx(1e-3) and _lr_at(spec, 10_000) == pytest.approx(1e-4)
    assert _lr_at(spec, 5_500) == pytest.approx(0.55e-3)


def test_check_grades_with_the_project_grader(built: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(built).eval()
    tokenizer = AutoTokenizer.from_pretrained(built)
    problems = load_toy(TOY_SETS[0], "test", 3, 0)
    accuracy = check_accuracy(model, tokenizer, problems, SamplingSpec(samples=2, max_new_tokens=4))
    assert (accuracy.questions, accuracy.samples, accuracy.pass_at_1) == (3, 2, 0.0)  # 4 tokens cannot answer
    assert grade(problems[0], f"steps\nThe answer is {problems[0].answer}").correct
    with pytest.raises(ValueError, match="several sets"):
        check_accuracy(model, tokenizer, [problems[0], load_toy(TOY_SETS[1], "test", 1, 0)[0]], SamplingSpec())
    with pytest.raises(ValueError, match="greedy"):
        SamplingSpec(samples=2, temperature=0.0)


def test_cli_build_refuses_existing_folder_and_show_prints_every_family(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["toy", "build", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "already exists" in " ".join(result.output.split())
    result = runner.invoke(app, ["toy", "build", "--out", str(tmp_path / "x"), "--tokens", "0"])
    assert result.exit_code == 2 and "positive" in " ".join(result.output.split())
    shown = runner.invoke(app, ["toy", "show", "--n", "1"])
    assert shown.exit_code == 0 and all(name in shown.output for name in TOY_SETS)
    assert "The answer is" in shown.output


def test_cli_defaults_are_the_spec_defaults() -> None:
    """The CLI spells its defaults out (to import torch only when building); they must stay the spec's."""
    params = inspect.signature(toy_cli.build).parameters
    defaults = {name: param.default.default for name, param in params.items()}  # typer OptionInfo
    spec = PretrainSpec()
    assert (defaults["tokens"], defaults["seed"], defaults["device"]) == (spec.tokens, spec.seed, spec.device)
    assert defaults["target_id_accuracy"] == spec.target_id_accuracy
    assert (defaults["lr"], defaults["init"]) == (spec.lr, spec.init)
    assert dict(spec.mixture.weights)[TOY_SETS[0]] == defaults["id_share"]


def test_cli_rejects_an_id_share_outside_zero_one(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["toy", "build", "--out", str(tmp_path / "x"), "--id-share", "1.5"])
    assert result.exit_code == 2 and "--id-share" in " ".join(result.output.split())
