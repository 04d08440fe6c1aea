"""The forwarder's read budget: lanes draining at once share it, within bounds."""

from __future__ import annotations

from appliance.process.forwarder import MIN_READ_BYTES, READ_BUDGET, READ_BYTES, read_size


def test_a_few_lanes_read_full_steps_and_many_share_the_budget() -> None:
    assert read_size(0) == read_size(1) == READ_BYTES
    assert read_size(READ_BUDGET // READ_BYTES) == READ_BYTES
    assert read_size(16) == READ_BUDGET // 16 < READ_BYTES
    # A hundred disks draining together read about the budget, not 100 x READ_BYTES.
    assert 100 * read_size(100) <= READ_BUDGET
    # ...but each still reads enough to make progress per step.
    assert read_size(10_000) == MIN_READ_BYTES
    assert all(read_size(n) >= read_size(n + 1) for n in range(1, 300))
