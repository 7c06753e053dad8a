"""Natural batching (koerier.batching): which items share a batch, how many batches run at
once, and how each caller gets its own result or error.

The handlers are real coroutines that record the batches they got; a test holds a batch
open with an event to make the load it wants, and counts turns of the event loop instead
of sleeping.
"""

from __future__ import annotations

import asyncio

import pytest

from koerier.batching import Batcher, NotStarted

# Enough turns of the event loop for a submit to reach its handler and come back
# (submit, start, run, resolve) with room to spare; far less than any timer would take.
TURNS = 10


class Recorder:
    """A handler that records its batches and answers each item with ``item * 10``.

    While ``gate`` is clear, batches wait in the handler, counted by ``in_flight``.
    """

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.in_flight = 0
        self.most_in_flight = 0

    async def __call__(self, items):
        self.batches.append(list(items))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.gate.wait()
        finally:
            self.in_flight -= 1
        return [item * 10 for item in items]


async def turns(count: int = TURNS) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


async def test_items_submitted_in_one_turn_share_one_batch():
    handler = Recorder()
    batcher = Batcher(handler)

    results = await asyncio.gather(*(batcher.submit(item) for item in range(5)))

    assert handler.batches == [[0, 1, 2, 3, 4]]
    assert results == [0, 10, 20, 30, 40]


async def test_a_lone_item_at_low_load_is_handled_alone_without_a_timer():
    handler = Recorder()
    batcher = Batcher(handler)

    submitted = asyncio.ensure_future(batcher.submit(7))
    await turns()

    assert submitted.done()
    assert submitted.result() == 70
    assert handler.batches == [[7]]


async def test_items_arriving_while_a_batch_runs_go_together_in_the_next():
    handler = Recorder()
    handler.gate.clear()
    batcher = Batcher(handler, concurrency=1)

    first = asyncio.ensure_future(batcher.submit(1))
    await turns()
    later = []
    for item in (2, 3, 4):  # one per turn: nothing but the running batch groups them
        later.append(asyncio.ensure_future(batcher.submit(item)))
        await turns(1)
    await turns()
    assert handler.batches == [[1]]

    handler.gate.set()
    results = await asyncio.gather(first, *later)

    assert handler.batches == [[1], [2, 3, 4]]
    assert results == [10, 20, 30, 40]


async def test_batch_max_caps_the_size_of_a_batch():
    handler = Recorder()
    batcher = Batcher(handler, batch_max=3, concurrency=1)

    results = await asyncio.gather(*(batcher.submit(item) for item in range(7)))

    assert handler.batches == [[0, 1, 2], [3, 4, 5], [6]]
    assert results == [item * 10 for item in range(7)]


async def test_at_most_concurrency_handlers_run_at_once():
    handler = Recorder()
    handler.gate.clear()
    batcher = Batcher(handler, batch_max=1, concurrency=2)

    submitted = [asyncio.ensure_future(batcher.submit(item)) for item in range(5)]
    await turns()
    assert handler.in_flight == 2
    assert handler.batches == [[0], [1]]

    handler.gate.set()
    results = await asyncio.gather(*submitted)

    assert results == [0, 10, 20, 30, 40]
    assert sorted(handler.batches) == [[0], [1], [2], [3], [4]]
    assert handler.most_in_flight == 2


async def test_an_exception_result_is_raised_to_its_caller_only():
    refused = ValueError("item 2 refused")

    async def handler(items):
        return [refused if item == 2 else item * 10 for item in items]

    batcher = Batcher(handler)

    async def outcome(item):
        try:
            return "returned", await batcher.submit(item)
        except ValueError as exc:
            return "raised", exc

    outcomes = await asyncio.gather(*(outcome(item) for item in (1, 2, 3)))

    assert outcomes == [("returned", 10), ("raised", refused), ("returned", 30)]
    assert outcomes[1][1] is refused


async def test_a_failing_handler_fails_every_caller_of_its_batch_and_not_the_next():
    batches = []

    async def handler(items):
        batches.append(list(items))
        if len(batches) == 1:
            raise RuntimeError("database gone")
        return [item * 10 for item in items]

    batcher = Batcher(handler)

    outcomes = await asyncio.gather(*(batcher.submit(item) for item in (1, 2, 3)),
                                    return_exceptions=True)
    after = await batcher.submit(4)

    assert batches == [[1, 2, 3], [4]]
    assert [type(outcome) for outcome in outcomes] == [RuntimeError] * 3
    assert all(str(outcome) == "database gone" for outcome in outcomes)
    assert after == 40


@pytest.mark.parametrize("cancelled_while", ["its_batch_runs", "waiting_for_a_batch"])
async def test_a_cancelled_caller_does_not_break_the_others(cancelled_while):
    handler = Recorder()
    handler.gate.clear()
    batcher = Batcher(handler, concurrency=1)
    if cancelled_while == "waiting_for_a_batch":
        ahead = asyncio.ensure_future(batcher.submit(0))  # holds the only batch slot
        await turns()
    else:
        ahead = None

    submitted = [asyncio.ensure_future(batcher.submit(item)) for item in (1, 2, 3)]
    await turns()
    submitted[1].cancel()
    await turns()
    handler.gate.set()
    outcomes = await asyncio.gather(*submitted, return_exceptions=True)

    assert outcomes[0] == 10
    assert isinstance(outcomes[1], asyncio.CancelledError)
    assert outcomes[2] == 30
    assert [1, 2, 3] in handler.batches
    if ahead is not None:
        assert await ahead == 0
    assert await asyncio.wait_for(batcher.submit(4), 5) == 40


async def test_a_handler_that_answers_too_few_results_fails_every_caller():
    async def short(items):
        return items[:1]

    batcher = Batcher(short, batch_max=10, concurrency=1)
    outcomes = await asyncio.gather(*(batcher.submit(n) for n in range(3)),
                                    return_exceptions=True)

    assert all(isinstance(outcome, RuntimeError) for outcome in outcomes), outcomes


async def test_an_item_not_started_in_time_fails_alone_and_is_never_handled():
    recorder = Recorder()
    batcher = Batcher(recorder, batch_max=10, concurrency=1)
    recorder.gate.clear()
    running = asyncio.ensure_future(batcher.submit(1))
    await turns()
    # The handler is stuck on item 1: item 2 waits, item 3 may wait as long as it takes.
    late = asyncio.ensure_future(batcher.submit(2, start_within=0.05))
    patient = asyncio.ensure_future(batcher.submit(3))
    with pytest.raises(NotStarted):
        await late
    recorder.gate.set()

    assert await running == 10
    assert await patient == 30
    assert recorder.batches == [[1], [3]]


async def test_an_item_whose_batch_started_is_not_abandoned_when_its_time_runs_out():
    recorder = Recorder()
    batcher = Batcher(recorder, batch_max=10, concurrency=1)
    recorder.gate.clear()
    started = asyncio.ensure_future(batcher.submit(1, start_within=0.05))
    await turns()
    await asyncio.sleep(0.1)
    recorder.gate.set()

    assert await started == 10
    assert recorder.batches == [[1]]
