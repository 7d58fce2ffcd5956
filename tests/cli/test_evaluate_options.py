from pathlib import Path

from imm_ray.cli.evaluate import _config


def test_eval_options_become_the_loops_eval_fields():
    config = _config(Path("imm_ray/assets/toy"), ["toy_id"], None, "test", 4, [1, 4], 8, 0.6, 64, 3, "auto", 1, 7)
    assert config.eval.num_shots == 3 and config.eval.seed == 7 and config.eval.samples == 4
    assert config.data.eval_limit == 8 and config.generation.max_new_tokens == 64
