"""The embedded default's model side: tokenizer, tiny Qwen2 model, pretraining and a quick accuracy check."""

from pathlib import Path

# The shipped base model (an HF folder built by `imm-ray toy build`); runs start from it, never retrain it.
TOY_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy"
# The distillation teacher (configs/strategies.yaml): a stronger toy built by the same command.
TOY_TEACHER_DIR = TOY_MODEL_DIR.parent / "toy_teacher"
