from pathlib import Path

import pytest
import yaml

from imm_ray.config import ConfigError, ExperimentConfig, apply_overrides, load_config, save_config

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_the_toy_experiment():
    config = load_config(None)
    assert config.model.path == "toy"
    assert config.experiment.strategies == ("imm", "vanilla")
    assert config.generation.temperatures == (0.2, 0.4, 0.6)


def test_shipped_toy_config_matches_defaults_where_it_is_silent():
    config = load_config(REPO / "configs" / "toy.yaml")
    assert config.data.train_set in config.data.eval_sets
    assert config.experiment.iterations == 3


def test_override_parses_yaml_values_and_lists():
    config = load_config(None, ["merge.alpha=0.3", "experiment.strategies=[imm]", "data.eval_limit=8"])
    assert config.merge.alpha == 0.3
    assert config.experiment.strategies == ("imm",)
    assert config.data.eval_limit == 8


def test_unknown_field_and_bad_value_are_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"merge": {"alpah": 0.5}, "sft": {"epochs": 0}}))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "merge.alpah: unknown field" in str(error.value)
    assert "sft.epochs" in str(error.value)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="model.teacher"):
        load_config(None, ["experiment.strategies=[distillation]"])
    with pytest.raises(ConfigError, match="eval.k|every k"):
        load_config(None, ["eval.samples=2", "eval.k=[1,4]"])
    with pytest.raises(ConfigError, match="train_set"):
        load_config(None, ["data.eval_sets=[gsm8k]"])


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(None, ["merge.alpha"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"merge": 3}, ["merge.alpha=1"])


def test_config_is_frozen_and_round_trips(tmp_path):
    config = load_config(None, ["experiment.name=x"])
    with pytest.raises(Exception):
        config.merge.alpha = 0.1  # type: ignore[misc]
    save_config(config, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config
    assert isinstance(config, ExperimentConfig)


def test_seed_is_a_single_replicate_and_seeds_a_list():
    from imm_ray.config import seeds_override

    assert load_config(None, ["experiment.seed=3"]).experiment.seeds == (3,)
    assert load_config(None, seeds_override("0,1,2")).experiment.seeds == (0, 1, 2)
    assert load_config(None).experiment.seed == 0
    with pytest.raises(ConfigError, match="experiment"):
        load_config(None, ["experiment.seed=1", "experiment.seeds=[1, 2]"])
    with pytest.raises(ConfigError, match="experiment.seeds"):
        load_config(None, seeds_override("1,1"))


def test_sampling_and_evaluation_exemplars_are_separate_fields():
    cfg = load_config(None, ["generation.num_shots=10"])
    assert cfg.generation.num_shots == 10 and cfg.eval.num_shots == 0
    with pytest.raises(ConfigError, match="data.num_shots: unknown field"):
        load_config(None, ["data.num_shots=3"])
