"""The merge record: a JSON file in the output folder saying how the model was made, and from what."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

RECORD_NAME = "merge_record.json"
ALPHA_MEANING = "weight of the ORIGINAL base model (Eq. 6): 1 returns the base, 0 the DARE'd fine-tuned model"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class InputRecord(_Frozen):
    """One input model: its role (base, previous, finetuned[i]), path and content fingerprint."""

    role: str
    path: str
    fingerprint: str


class MaskRecord(_Frozen):
    """How DARE's random drop was drawn, so that anyone can regenerate the same masks."""

    generator: str
    seeding: str
    resolution_bits: int
    drop_rate: float
    effective_drop_rate: float
    rescale: float


class MergeRecord(_Frozen):
    """Everything that fixes the merged model's bytes, plus what it cost."""

    kind: Literal["imm-ray merge record"] = "imm-ray merge record"
    version: str
    method: str
    alpha: float
    alpha_meaning: str = ALPHA_MEANING
    drop_rate: float
    seed: int
    iteration: int
    exclude: str | None
    excluded_tensors: tuple[str, ...]
    dtype: str
    mask: MaskRecord | None
    magnitude_trim: str | None
    importance: str | None
    layer_scales: dict[int, float] | None
    inputs: tuple[InputRecord, ...]
    fingerprint_kind: str
    tensors: int
    shards: int
    bytes_written: int
    chunk_elements: int
    workers: int
    seconds: float
    created_at: str

    def write(self, folder: Path) -> Path:
        path = folder / RECORD_NAME
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def read(cls, folder: Path) -> MergeRecord:
        return cls.model_validate_json((folder / RECORD_NAME).read_text())
