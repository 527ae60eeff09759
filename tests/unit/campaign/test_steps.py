"""campaign.steps: the ONE table of step -> actor -> queue -> statuses."""

from __future__ import annotations

import pytest

from campaign import steps


def test_the_step_table_is_the_one_map_of_names_queues_and_statuses():
    assert [s.name for s in steps.STEPS] == ["generate", "split", "send_part"]
    assert steps.for_status("generating") is steps.GENERATE and steps.for_status("sending") is steps.SEND_PART
    assert set(steps.IN_FLIGHT) == {"queued", "generating", "splitting", "sending"}
    with pytest.raises(KeyError):
        steps.for_status("sent")
    with pytest.raises(ValueError):
        steps.SEND_PART.args(1)  # the send step needs the inbox (per-inbox pacing)
