import pytest

from imm_ray.config import load_config
from imm_ray.preflight import (
    PreflightError, check_memory, check_model_folder, check_resources, prepare_run, resolve_model,
)


def test_missing_model_folder_names_the_field(tmp_path):
    with pytest.raises(PreflightError, match=r"model.path: .*nope is not a model folder"):
        resolve_model("model.path", str(tmp_path / "nope"), False)


def test_folder_without_safetensors_is_refused_with_conversion_hint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(PreflightError, match="pickle checkpoints .*pytorch_model.bin.*safe_serialization"):
        check_model_folder("model.teacher", tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    (tmp_path / "config.json").unlink()
    with pytest.raises(PreflightError, match="no config.json"):
        check_model_folder("model.path", tmp_path)


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PreflightError, match="model.path: no-such-org/no-such-model is neither a local folder"):
        resolve_model("model.path", "no-such-org/no-such-model", False)


def test_an_unreachable_hub_is_asked_once_then_only_the_cache(monkeypatch):
    import socket

    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls: list[dict] = []

    def refuse(address, timeout=None):
        raise OSError(101, "Network is unreachable")

    def download(repo_id, **kwargs):
        calls.append(kwargs)
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    with pytest.raises(PreflightError, match="cannot be reached: Network is unreachable; not in the local hub cache"):
        resolve_model("model.path", "no-such-org/no-such-model", False)
    assert [call["local_files_only"] for call in calls] == [True]


def test_more_workers_than_cpus_is_refused(ray_cluster):
    with pytest.raises(PreflightError, match=r"resources.sft_workers .* asks for 4 CPUs but the Ray cluster has 2"):
        check_resources(load_config(None, ["resources.sft_workers=4"]))
    with pytest.raises(PreflightError, match="GPUs"):
        check_resources(load_config(None, ["resources.use_gpu=true"]))
    check_resources(load_config(None))  # the toy default fits a 2-CPU machine


def test_an_analysis_asking_for_more_cpus_than_a_node_has_is_refused(ray_cluster):
    with pytest.raises(PreflightError, match=r"stage analysis .* 3 CPUs asked, 2 there"):
        check_memory(load_config(None, ["eval.analysis_cpus=3"]))
    check_memory(load_config(None))  # the toy's 2 fit the 2-CPU node


def test_unknown_data_set_is_named_before_any_work(ray_cluster):
    with pytest.raises(PreflightError, match="data.eval_sets: .*no_such_set"):
        prepare_run(load_config(None, ["data.eval_sets=[toy_id, no_such_set]"]))
    with pytest.raises(PreflightError, match="data.train_set"):
        prepare_run(load_config(None, ["data.train_set=gsm8k", "data.eval_sets=[gsm8k]",
                                       "data.data_dir=/nonexistent", "data.train_path=/nonexistent/train.jsonl"]))


def test_sft_prompts_are_the_evaluation_format_through_the_chat_template(tmp_path, monkeypatch):
    """With data.chat_template on, the prompt SFT trains on is the prompt evaluation asks (zero-shot, chat),
    while sampling may use exemplars (generation.num_shots)."""
    import shutil
    from pathlib import Path

    import imm_ray.preflight as preflight

    model = tmp_path / "toy"
    shutil.copytree(Path(preflight.__file__).parent / "assets" / "toy", model)
    config = (model / "tokenizer_config.json")
    import json

    settings = json.loads(config.read_text())
    settings["chat_template"] = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    config.write_text(json.dumps(settings))
    monkeypatch.setattr(preflight, "check_resources", lambda cfg: None)  # the one check that needs a cluster
    prepared = prepare_run(load_config(None, [f"model.path={model}", "data.chat_template=true", "data.train_limit=4",
                                              "data.eval_limit=4", "data.eval_sets=[toy_id]", "data.train_split=test",
                                              "generation.num_shots=2"]))
    eval_prompts = dict(zip([p.id for p in prepared.eval_sets["toy_id"]], prepared.eval_prompts["toy_id"]))
    assert prepared.sft_prompts == eval_prompts and all(p.startswith("<|user|>") for p in eval_prompts.values())
    assert all(t != prepared.sft_prompts[p.id] for p, t in zip(prepared.train_problems, prepared.train_prompts))


def test_memory_plan_refuses_before_any_model_is_resolved(ray_cluster):
    """A folder holding only a config.json (no weights) is enough to plan: the memory check names the stage that
    cannot fit before the model folder itself is checked."""
    from pathlib import Path

    shape_only = Path(__file__).resolve().parents[1] / "fixtures" / "model_configs" / "Qwen2.5-0.5B-Instruct"
    config = load_config(None, [f"model.path={shape_only}", "resources.sft_workers=64"])
    with pytest.raises(PreflightError, match=r"^memory plan: stage sft \(Qwen2.5-0.5B-Instruct\).*needs 64 processes"):
        prepare_run(config)
    small = ["sft.max_length=64", "sft.per_device_batch_size=1", "generation.questions_per_batch=4"]
    with pytest.raises(PreflightError, match="has no .safetensors weights"):  # the plan fits: the folder is next
        prepare_run(load_config(None, [f"model.path={shape_only}", *small]))


def test_cluster_capacity_reads_no_private_ray_state():
    import inspect

    from imm_ray import preflight

    assert "_private" not in inspect.getsource(preflight)
