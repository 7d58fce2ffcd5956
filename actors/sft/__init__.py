"""Supervised fine-tuning inside Ray Train workers, under DeepSpeed. The driver side is ``actors.training``.

- ``job``: what one SFT run needs (:class:`~actors.sft.job.SFTJob`) and the DeepSpeed config it implies;
- ``batches``: which examples each rank trains on at each optimizer step, the same whatever the worker count;
- ``checkpoint``: the world-size-independent checkpoint format (safetensors, never pickle) and its restore;
- ``shm_op``: DeepSpeed's shared-memory all-reduce op, built by ``make setup`` and loaded by each worker under a lock;
- ``worker``: the training loop each Ray Train worker runs.
"""
