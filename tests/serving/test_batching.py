"""Continuous batching on its own, around plain functions: concurrent calls merged, each caller its own row."""

import asyncio
import threading

import numpy as np
import pytest

from serving.batching import Batcher


class Recorder:
    """A model that records the batch sizes it is called with; ``gate`` holds its first call until released."""

    def __init__(self, fail_on: int | None = None):
        self.sizes, self.fail_on, self.gate = [], fail_on, threading.Event()

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        self.sizes.append(len(rows))
        self.gate.wait(timeout=10)
        if self.fail_on is not None and self.fail_on in rows[:, 0]:
            raise ValueError(f"cannot compute {self.fail_on}")
        return rows * 10


def prepare(item: int) -> np.ndarray:
    """An item's model input; negative items are bad input."""
    if item < 0:
        raise ValueError(f"bad item {item}")
    return np.array([item, item])


def row(value: int) -> np.ndarray:
    return np.array([value, value])


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def held(max_batch_size: int, fail_on: int | None = None) -> tuple[Recorder, Batcher, asyncio.Task]:
    """A batcher whose model is computing a first call (item 0, or 1 with ``fail_on``), held by its gate."""
    model = Recorder(fail_on)
    batcher = Batcher(prepare, model, max_batch_size)
    first = asyncio.create_task(batcher(0 if fail_on is None else 1))
    while not model.sizes:
        await asyncio.sleep(0.001)
    return model, batcher, first


@pytest.mark.anyio
async def test_a_lone_call_is_computed_at_once():
    model = Recorder()
    model.gate.set()
    np.testing.assert_array_equal(await Batcher(prepare, model, max_batch_size=8)(3), row(30))
    assert model.sizes == [1]


@pytest.mark.anyio
async def test_calls_queued_while_the_model_computes_share_the_next_call_and_get_their_own_rows():
    model, batcher, first = await held(4)
    later = [asyncio.create_task(batcher(value)) for value in range(1, 8)]
    await asyncio.sleep(0.01)
    model.gate.set()
    answers = await asyncio.gather(first, *later)
    assert model.sizes == [1, 4, 3]             # 1..4 fill the second call, 5..7 the third
    for value, answer in enumerate(answers):
        np.testing.assert_array_equal(answer, row(value * 10))


@pytest.mark.anyio
async def test_a_bad_item_fails_its_own_caller_and_the_rest_of_its_batch_is_computed():
    model, batcher, first = await held(4)
    good, bad, other = (asyncio.create_task(batcher(value)) for value in (1, -1, 2))
    await asyncio.sleep(0.01)
    model.gate.set()
    with pytest.raises(ValueError, match="bad item -1"):
        await bad
    np.testing.assert_array_equal(await good, row(10))
    np.testing.assert_array_equal(await other, row(20))
    await first
    assert model.sizes == [1, 2]                # the bad item never reached the model
    with pytest.raises(ValueError, match="bad item -2"):
        await batcher(-2)                       # a batch of only bad items: no model call
    assert model.sizes == [1, 2]


@pytest.mark.anyio
async def test_a_failing_model_call_fails_only_its_own_callers_and_the_batcher_goes_on():
    model, batcher, first = await held(2, fail_on=2)
    in_failing_call = [asyncio.create_task(batcher(value)) for value in (2, 3)]
    after = asyncio.create_task(batcher(4))
    await asyncio.sleep(0.01)
    model.gate.set()
    np.testing.assert_array_equal(await first, row(10))
    for task in in_failing_call:
        with pytest.raises(ValueError, match="cannot compute 2"):
            await task
    np.testing.assert_array_equal(await after, row(40))
    np.testing.assert_array_equal(await batcher(5), row(50))


@pytest.mark.anyio
async def test_a_caller_that_gave_up_does_not_stop_the_others():
    model, batcher, first = await held(4)
    impatient = asyncio.create_task(batcher(1))
    patient = asyncio.create_task(batcher(2))
    await asyncio.sleep(0.01)
    impatient.cancel()
    model.gate.set()
    np.testing.assert_array_equal(await patient, row(20))
    np.testing.assert_array_equal(await first, row(0))
    assert impatient.cancelled()
