"""DARE keep-masks that depend only on (seed, iteration, tensor name, model index) and the element index.

Why this design (measured, DESIGN.md): random numbers are the main cost of a DARE merge. numpy's PCG64 gives raw
64-bit words about five times faster than ``torch.rand`` gives floats, and PCG64 can ``advance`` by any number of
words in O(log n). Each 64-bit word is read as four little-endian uint16 lanes; element ``i`` of a tensor always
uses lane ``i % 4`` of word ``i // 4`` of that tensor's own stream. So the mask of any element range is the same
whatever the chunking, the worker count or the order in which ranges are processed.

Resolution: an element is dropped when its uint16 draw is below ``round(p * 65536)``, so the drop probability is
``p`` quantised to a multiple of 1/65536 (exact for p = 0, 0.5, 0.25, ...; p = 0.2 becomes 0.19999695). The
rescale of kept entries stays the literal ``1 / (1 - p)`` of the requested p. The merge record states both.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

MASK_BITS = 16
LANES_PER_WORD = 64 // MASK_BITS
GENERATOR = "numpy PCG64, advanced per element range"
SEEDING = "blake2b-128 of 'imm-ray/dare/v1|seed|iteration|model index|tensor name' -> numpy SeedSequence"


def drop_threshold(drop_rate: float) -> int:
    """The uint16 value below which an element is dropped."""
    return round(drop_rate * (1 << MASK_BITS))


def effective_drop_rate(drop_rate: float) -> float:
    """The drop probability the masks really have, after quantisation to 1/65536."""
    return drop_threshold(drop_rate) / (1 << MASK_BITS)


@dataclass(frozen=True)
class MaskKey:
    """Everything a tensor's mask stream depends on; nothing else (worker, chunk, order) enters it."""

    seed: int
    iteration: int
    name: str
    model_index: int = 0

    def seed_sequence(self) -> np.random.SeedSequence:
        # A stable hash, never Python's hash(): that one is salted per process.
        text = f"imm-ray/dare/v1|{self.seed}|{self.iteration}|{self.model_index}|{self.name}"
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        return np.random.SeedSequence(int.from_bytes(digest, "little"))


class KeepMaskStream:
    """Keep-masks (uint8 0/1) for consecutive element ranges of one tensor, starting at element ``start``."""

    def __init__(self, key: MaskKey, drop_rate: float, start: int = 0) -> None:
        self._threshold = drop_threshold(drop_rate)
        self._bits = np.random.PCG64(key.seed_sequence())
        word, lane = divmod(start, LANES_PER_WORD)
        self._bits.advance(word)
        self._carry = self._lanes(1)[lane:] if lane else np.empty(0, dtype="<u2")

    def _lanes(self, words: int) -> np.ndarray:
        return self._bits.random_raw(words).astype("<u8", copy=False).view("<u2")

    def take(self, count: int) -> np.ndarray:
        """The next ``count`` keep flags (1 = keep), as a uint8 array torch can multiply with directly."""
        missing = count - len(self._carry)
        fresh = self._lanes(-(-missing // LANES_PER_WORD)) if missing > 0 else self._carry[:0]
        lanes = np.concatenate([self._carry, fresh]) if len(self._carry) else fresh
        self._carry = lanes[count:].copy()
        return (lanes[:count] >= self._threshold).view(np.uint8)


def keep_mask(key: MaskKey, drop_rate: float, start: int, stop: int) -> np.ndarray:
    """The keep flags of elements ``start`` .. ``stop - 1`` of the tensor named in ``key``."""
    return KeepMaskStream(key, drop_rate, start).take(stop - start)
