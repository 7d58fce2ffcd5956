from actors.sft.batches import (
    epoch_order, micro_batches_per_step, rank_micro_batches, response_tokens, step_members, steps_per_epoch,
    total_optimizer_steps,
)
from imm_ray.tokens import IGNORE_INDEX


def _step_examples(members, world, batch_size):
    """Every rank's real examples of one step, and the micro-batch count each rank runs."""
    ranks = [rank_micro_batches(members, rank=r, world=world, batch_size=batch_size) for r in range(world)]
    return sorted(i for batches in ranks for batch in batches for i in batch), {len(b) for b in ranks}


def test_a_step_trains_on_the_same_examples_on_any_number_of_workers():
    size, global_batch = 23, 8
    order = epoch_order(size, seed=5, epoch=2)
    assert sorted(order) == list(range(size)) and order != list(range(size))
    assert steps_per_epoch(size, global_batch) == 3 and total_optimizer_steps(size, global_batch, 2) == 6
    for step in range(3):
        members = step_members(order, step, global_batch)
        assert len(members) == (8 if step < 2 else 7)
        for world in (1, 2, 3, 5, 8):
            examples, counts = _step_examples(members, world, batch_size=2)
            assert examples == sorted(members)  # each example once, on exactly one rank
            assert counts == {micro_batches_per_step(len(members), world, 2)}  # the same count on every rank


def test_short_shares_get_filler_micro_batches_with_no_examples():
    members = [4, 9, 1]  # an epoch's last step: 3 examples on 2 workers, micro-batches of 1
    assert rank_micro_batches(members, rank=0, world=2, batch_size=1) == [[4], [1]]
    assert rank_micro_batches(members, rank=1, world=2, batch_size=1) == [[9], []]
    assert rank_micro_batches([7], rank=3, world=4, batch_size=2) == [[]]  # fewer examples than workers


def test_the_order_depends_on_seed_and_epoch_only():
    assert epoch_order(50, seed=1, epoch=0) == epoch_order(50, seed=1, epoch=0)
    assert epoch_order(50, seed=1, epoch=1) != epoch_order(50, seed=1, epoch=0)
    assert epoch_order(50, seed=2, epoch=0) != epoch_order(50, seed=1, epoch=0)


def test_response_tokens_are_the_targets_of_the_shifted_loss():
    ids = [5, 6, 7, 8, 9]
    labels = [IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9]
    assert response_tokens((ids, labels)) == 3
    assert response_tokens((ids, [5, 6, 7, 8, 9])) == 4  # the first position is never predicted
