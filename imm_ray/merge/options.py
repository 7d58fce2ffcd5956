"""The options of one merge: a frozen pydantic model, checked field by field before any work starts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from imm_ray.merge.methods import METHODS

DEFAULT_CHUNK_ELEMENTS = 1 << 18  # 1 MiB of float32: the chunk's working set stays in cache (measured fastest)
OutputDtype = Literal["auto", "bfloat16", "float16", "float32"]


class MergeOptions(BaseModel):
    """What to merge, how, and where to.

    ``previous`` is θ^t, the model that was fine-tuned in iteration t (θ^0 is the base, the default). ``alpha`` is
    the weight of the ORIGINAL base (Eq. 6): α = 1 returns the base, α = 0 the DARE'd fine-tuned model.
    ``drop_rate`` is DARE's p (TIES: the share of smallest-magnitude entries trimmed); tensors whose name matches
    ``exclude`` keep their full delta, unmasked and unscaled (IIMM's layer scale, a separate factor, still applies).
    ``chunk_elements`` bounds a worker's memory (about ten float32 buffers of that many elements) and does not change
    the result; ``workers`` defaults to every CPU of the Ray cluster.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    base: Path
    finetuned: tuple[Path, ...] = Field(min_length=1)
    previous: Path | None = None
    out: Path
    method: str = "imm"
    alpha: float = Field(ge=0, le=1)
    drop_rate: float = Field(ge=0, lt=1)
    seed: int = Field(ge=0)
    iteration: int = Field(0, ge=0)
    exclude: str | None = None
    dtype: OutputDtype = "auto"
    overwrite: bool = False
    importance: Path | None = None
    chunk_elements: int = Field(DEFAULT_CHUNK_ELEMENTS, ge=1)
    workers: int | None = Field(None, ge=1)

    @field_validator("finetuned", mode="before")
    @classmethod
    def _one_path_is_a_tuple(cls, value: object) -> object:
        return (value,) if isinstance(value, (str, Path)) else value

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown method {value!r}; choose one of {', '.join(METHODS)}")
        return value

    @field_validator("exclude")
    @classmethod
    def _valid_regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as error:
                raise ValueError(f"not a valid regular expression ({error})") from None
        return value

    @model_validator(mode="after")
    def _fits_method(self) -> MergeOptions:
        method = METHODS[self.method]
        count = len(self.finetuned)
        if count < method.min_models or (method.max_models is not None and count > method.max_models):
            most = "" if method.max_models is None else f" and at most {method.max_models}"
            raise ValueError(f"finetuned: method {self.method!r} takes at least {method.min_models}{most} "
                             f"fine-tuned model(s), got {count}")
        if self.drop_rate > 0 and not method.uses_drop_rate:
            raise ValueError(f"drop_rate: method {self.method!r} drops nothing; set it to 0")
        if method.needs_importance != (self.importance is not None):
            need = "needs" if method.needs_importance else "does not take"
            raise ValueError(f"importance: method {self.method!r} {need} a layer-importance CSV")
        inputs = {self.base.resolve(), self.previous_model.resolve(), *(p.resolve() for p in self.finetuned)}
        if self.out.resolve() in inputs:
            raise ValueError(f"out: {self.out} is one of the input folders")
        return self

    @property
    def previous_model(self) -> Path:
        """θ^t: ``previous`` if given, else the base (iteration 0)."""
        return self.previous if self.previous is not None else self.base

    def excludes(self, name: str) -> bool:
        """Whether tensor ``name`` keeps its full delta (no DARE mask, no rescale, no TIES trim)."""
        return self.exclude is not None and re.search(self.exclude, name) is not None


def describe_errors(error: ValidationError) -> str:
    """One line naming each invalid field, e.g. ``drop_rate: Input should be less than 1``."""
    parts = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"{field}: {message}" if field else message)
    return "; ".join(parts)
