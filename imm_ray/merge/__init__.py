"""The merge engine's pure side: methods (one registry), deterministic DARE masks, streaming safetensors I/O,
options and the merge record. No Ray here: the actor pool in ``actors.merging`` drives :mod:`imm_ray.merge.engine`.
"""

from imm_ray.merge.errors import MergeError, PickleCheckpointError
from imm_ray.merge.methods import METHODS, MergeMethod
from imm_ray.merge.options import MergeOptions
from imm_ray.merge.record import MergeRecord

__all__ = ["METHODS", "MergeError", "MergeMethod", "MergeOptions", "MergeRecord", "PickleCheckpointError"]
