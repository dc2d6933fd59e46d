"""The heartbeat names the rank that stopped and its watchdog ends a rank that waits too long
(the NCCL case, where a dead peer is a silent hang). A two-rank world is played in one process
with an in-memory store: rank 1's counter is driven by the test."""

from __future__ import annotations

import threading
import time

import pytest
import torch.distributed as tdist

from irdro import dist


@pytest.fixture
def two_ranks(monkeypatch):
    store = tdist.HashStore()
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "global_rank", lambda: 0)
    monkeypatch.setattr(tdist.distributed_c10d, "_get_default_store", lambda: store)
    return store


def test_describe_names_a_silent_rank_and_a_stuck_one(two_ranks):
    hb = dist.Heartbeat(interval_s=0.05)
    hb.at_step(3)
    two_ranks.set("irdro/step/1", "1")
    two_ranks.add("irdro/beat/1", 1)  # rank 1 beat once, then went silent
    assert hb.describe() == "rank 1 stopped answering (no heartbeat; last seen at step 2)"

    beating = threading.Event()

    def rank1_beats():  # alive, but its step stays behind
        while not beating.is_set():
            two_ranks.add("irdro/beat/1", 1)
            time.sleep(0.01)

    t = threading.Thread(target=rank1_beats)
    t.start()
    try:
        assert hb.describe() == "rank 1 answers but is stuck at step 2"
        two_ranks.set("irdro/step/1", "3")
        assert hb.describe().startswith("every rank still answers")
    finally:
        beating.set()
        t.join()
        hb.stop()


def test_watchdog_fires_only_without_progress(two_ranks):
    fired: list[str] = []
    hb = dist.Heartbeat(timeout_s=0.6, on_hang=fired.append, interval_s=0.05)
    try:
        for step in range(8):  # progress every 0.15 s: no alarm
            hb.at_step(step)
            time.sleep(0.15)
        assert fired == []
        deadline = time.monotonic() + 10
        while not fired and time.monotonic() < deadline:  # rank 0 now waits on a silent rank 1
            time.sleep(0.05)
        assert len(fired) == 1 and fired[0].startswith("no progress for ")
        assert "at step 8: rank 1 stopped answering" in fired[0]
    finally:
        hb.stop()
