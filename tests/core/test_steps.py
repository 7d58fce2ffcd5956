"""Stage declarations: a field a stage reads changes its fingerprint and its dependents', and nothing else."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import imm_ray.stages as stages
from imm_ray.config import load_config
from imm_ray.data.registry import load_set
from imm_ray.loop import IterationLoop
from imm_ray.preflight import ModelRef, PreparedRun, _prompts
from imm_ray.stages import model_fingerprint
from imm_ray.steps import ExternalModel
from imm_ray.strategies import STRATEGIES

TOY = Path(__file__).resolve().parents[2] / "imm_ray" / "assets" / "toy"
BASE = ["experiment.iterations=2", "experiment.strategies=[imm, vanilla, mixture]",
        "data.train_limit=8", "data.eval_limit=4"]


def _prepared(overrides: list[str]) -> PreparedRun:
    """What prepare_run returns, without Ray (the resource check is the only part that needs a cluster)."""
    cfg = load_config(None, BASE + overrides)
    train = load_set(cfg.data.train_set, "train", limit=cfg.data.train_limit, seed=cfg.data.seed)
    evals = {n: load_set(n, "test", limit=cfg.data.eval_limit, seed=cfg.data.seed) for n in cfg.data.eval_sets}
    return PreparedRun(
        config=cfg, base=ModelRef(str(TOY), model_fingerprint(TOY)), teacher=None, train_problems=train,
        train_prompts=_prompts(cfg, cfg.data.train_set, train, str(TOY), cfg.generation.num_shots),
        sft_prompts=dict(zip([p.id for p in train], _prompts(cfg, cfg.data.train_set, train, str(TOY), 0))),
        eval_sets=evals, eval_prompts={n: _prompts(cfg, n, p, str(TOY), cfg.eval.num_shots) for n, p in evals.items()},
        engine_kind="transformers",
    )


def declared_stages(overrides: list[str], tmp_path: Path) -> dict[str, str]:
    """Every stage of a run as the loop declares it, name -> fingerprint (no stage is run)."""
    prepared = _prepared(overrides)
    loop = IterationLoop(prepared.config, run_dir=tmp_path / "run")
    loop.prepared = prepared
    base = ExternalModel(path=prepared.base.path, content=prepared.base.fingerprint)
    found = {"base/eval": _eval(loop, base).fingerprint}
    for seed in prepared.config.experiment.seeds:
        for name in prepared.config.experiment.strategies:
            strategy, current, generations = STRATEGIES[name], base, []
            for t in range(prepared.config.experiment.iterations):
                where = f"{seed}/{name}/{t}"
                samples = loop.generate(current, seed, t)
                pairs = loop.select_pairs(strategy, samples, tuple(generations), seed, t)
                generations.append(samples)
                sft = loop.fine_tune(current, pairs, seed, t)
                found.update({f"{where}/generate": samples.fingerprint, f"{where}/sft_data": pairs.fingerprint,
                              f"{where}/sft": sft.fingerprint, f"{where}/eval_sft": _eval(loop, sft).fingerprint})
                current = sft
                if strategy.merge_method:
                    merged = loop.merge(base, sft.model, sft, seed, t, strategy.merge_method)
                    found.update({f"{where}/merge": merged.fingerprint,
                                  f"{where}/eval_merge": _eval(loop, merged).fingerprint})
                    current = merged
    return found


def _eval(loop: IterationLoop, model):
    captured = {}
    loop._run = lambda step, link, what: captured.setdefault("step", step)  # declare only
    loop.evaluate(model, Path("unused"))
    return captured["step"]


def changed(overrides: list[str], tmp_path: Path) -> set[str]:
    before, after = declared_stages([], tmp_path), declared_stages(overrides, tmp_path)
    return {name for name in before if before[name] != after.get(name)}


def _all(kind: str, names) -> set[str]:
    return {n for n in names if n.endswith("/" + kind)}


@pytest.fixture(scope="module")
def names(tmp_path_factory) -> set[str]:
    return set(declared_stages([], tmp_path_factory.mktemp("names")))


def test_an_unchanged_config_declares_the_same_stages(tmp_path):
    assert declared_stages([], tmp_path) == declared_stages([], tmp_path)


def test_iteration_zero_is_shared_by_every_strategy(tmp_path):
    found = declared_stages([], tmp_path)
    for kind in ("generate", "sft_data", "sft", "eval_sft"):
        assert len({found[f"0/{s}/0/{kind}"] for s in ("imm", "vanilla", "mixture")}) == 1


@pytest.mark.parametrize("override", ["resources.merge_workers=1", "resources.generation_actors=1",
                                      "resources.sft_max_failures=2", "data.mixture_share=0.25"])
def test_fields_that_cannot_change_an_output_change_nothing(override, tmp_path):
    # (mixture_share is read by the mixture policy only, which this test's strategies leave out)
    assert changed(["experiment.strategies=[imm, vanilla]", override], tmp_path) - changed(
        ["experiment.strategies=[imm, vanilla]"], tmp_path) == set()


def test_evaluation_fields_change_only_evaluations(tmp_path, names):
    evals = _all("eval", names) | _all("eval_sft", names) | _all("eval_merge", names)
    for override in ("eval.temperature=0.4", "eval.max_new_tokens=32", "eval.samples=6", "eval.seed=1"):
        assert changed([override], tmp_path) == evals, override


def test_generation_fields_change_generation_and_everything_after_it(tmp_path, names):
    # eval.max_new_tokens is unset, so evaluation reads generation.max_new_tokens too; top_p is shared as well
    for override in ("generation.max_new_tokens=64", "generation.top_p=0.9"):
        assert changed([override], tmp_path) == names, override
    only_generation = names - {"base/eval"}
    assert changed(["generation.temperatures=[0.6]"], tmp_path) == only_generation
    # the request grouping decides the seeds of the draws: a new one is new samples (and a new evaluation)
    assert changed(["generation.questions_per_batch=4"], tmp_path) == names


def test_sft_fields_change_sft_and_what_depends_on_it(tmp_path, names):
    expected = names - {"base/eval"} - {n for n in names if n.endswith(("0/generate", "0/sft_data"))}
    for override in ("sft.learning_rate=0.001", "resources.sft_min_workers=1", "resources.sft_workers=1"):
        assert changed([override], tmp_path) == expected, override


def test_merge_fields_change_only_merges_and_what_follows_them(tmp_path, names):
    out = changed(["merge.alpha=0.3"], tmp_path)
    assert "0/imm/0/merge" in out and "0/imm/0/eval_merge" in out and "0/imm/1/generate" in out
    assert not {n for n in out if "/vanilla/" in n or "/mixture/" in n or n == "base/eval"}
    assert "0/imm/0/sft" not in out


def test_mixture_share_is_read_by_the_mixture_policy_only(tmp_path):
    out = changed(["experiment.strategies=[imm, vanilla, mixture]", "data.mixture_share=0.25"], tmp_path)
    assert out and all("/mixture/" in n and "/mixture/0/" not in n for n in out)
    assert "0/mixture/1/sft_data" in out


def test_a_new_seed_shares_only_the_base_evaluation(tmp_path):
    found = declared_stages(["experiment.seeds=[0, 1]"], tmp_path)
    seed0 = {k[2:]: v for k, v in found.items() if k.startswith("0/")}
    seed1 = {k[2:]: v for k, v in found.items() if k.startswith("1/")}
    assert seed0.keys() == seed1.keys() and not set(seed0.values()) & set(seed1.values())
    assert found == {**declared_stages([], tmp_path), **{f"1/{k}": v for k, v in seed1.items()}}


def changed_by_editing(relative: str, tmp_path: Path, monkeypatch) -> set[str]:
    """The stages whose fingerprints change when one source file of a copy of the project is edited."""
    copy = tmp_path / "src"
    for package in stages.PROJECT_PACKAGES:
        shutil.copytree(stages.PROJECT_ROOT / package, copy / package,
                        ignore=shutil.ignore_patterns("__pycache__", "assets"))
    monkeypatch.setattr(stages, "PROJECT_ROOT", copy)

    def declared() -> dict[str, str]:
        stages.code_identity.cache_clear()
        stages.module_closure.cache_clear()
        return declared_stages([], tmp_path)

    try:
        before = declared()
        source = copy / relative
        source.write_text(source.read_text() + "\n# an edit\n")
        after = declared()
    finally:
        stages.code_identity.cache_clear()
        stages.module_closure.cache_clear()
    return {n for n in before if before[n] != after[n]}


def test_editing_the_grader_invalidates_generation_and_evaluation(tmp_path, monkeypatch, names):
    out = changed_by_editing("imm_ray/grading.py", tmp_path, monkeypatch)
    assert {"base/eval", "0/imm/0/generate", "0/imm/0/eval_sft", "0/imm/0/eval_merge"} <= out
    assert out == names  # every later stage was trained on graded samples, so it follows


def test_editing_the_merge_code_leaves_generation_and_sft_reusable(tmp_path, monkeypatch):
    out = changed_by_editing("imm_ray/merge/methods.py", tmp_path, monkeypatch)
    assert "0/imm/0/merge" in out and "0/imm/1/generate" in out
    assert not {n for n in out if "/vanilla/" in n or n == "base/eval" or n.startswith("0/imm/0/") and
                not n.endswith(("merge", "eval_merge"))}


def test_model_fingerprint_reads_tokenizer_and_weight_bytes_not_file_times(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(TOY, folder)
    before = model_fingerprint(folder)
    tokenizer = folder / "tokenizer.json"
    text = tokenizer.read_text()
    tokenizer.touch()  # a new mtime, the same bytes
    assert model_fingerprint(folder) == before
    tokenizer.write_text(text.replace("<|endoftext|>", "<|end|>", 1))
    assert model_fingerprint(folder) != before


def test_the_engine_dtype_is_concrete_in_the_declaration_and_changes_the_samples(tmp_path, names):
    prepared = _prepared(["generation.dtype=float32", "generation.attention=sdpa"])
    spec = prepared.engine_spec("")
    assert (spec.dtype, spec.attention) == ("float32", "sdpa")
    auto = _prepared([]).engine_spec("")
    assert auto.dtype in ("float32", "bfloat16") and auto.attention in ("sdpa", "eager")
    assert changed(["generation.dtype=float16"], tmp_path) == names  # every generation and evaluation


def test_large_values_enter_the_identity_as_a_hash_and_still_tell_data_apart(tmp_path):
    loop = IterationLoop(_prepared([]).config, run_dir=tmp_path / "run")
    loop.prepared = _prepared([])
    base = ExternalModel(path=loop.prepared.base.path, content=loop.prepared.base.fingerprint)
    step = loop.generate(base, 0, 0)
    assert set(step.identity["values"]["problems"]) == {"sha256"}  # the record stays small
    assert step.identity["values"]["plan"]["samples_per_question"] == 4  # small values stay readable
    edited = step.model_copy(update={"problems": (step.problems[0].model_copy(update={"answer": "-1"}),
                                                  *step.problems[1:])})
    assert edited.fingerprint != step.fingerprint
