"""Continuous batching on its own, around a plain function: concurrent calls merged, each caller its own rows."""

import asyncio
import threading

import numpy as np
import pytest

from serving.batching import Batcher


class Recorder:
    """A model that records the batch sizes it is called with; ``gate`` holds its first call until released."""

    def __init__(self, fail_on: int | None = None):
        self.sizes, self.fail_on, self.gate = [], fail_on, threading.Event()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.sizes.append(len(images))
        self.gate.wait(timeout=10)
        if self.fail_on is not None and self.fail_on in images[:, 0]:
            raise ValueError(f"cannot compute {self.fail_on}")
        return images * 10


def rows(*values: int) -> np.ndarray:
    return np.array([[value, value] for value in values])


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_a_lone_call_is_computed_at_once():
    model = Recorder()
    model.gate.set()
    np.testing.assert_array_equal(await Batcher(model, max_batch_size=8)(rows(3)), rows(30))
    assert model.sizes == [1]


@pytest.mark.anyio
async def test_calls_queued_while_the_model_computes_share_the_next_call_and_get_their_own_rows():
    model = Recorder()
    batcher = Batcher(model, max_batch_size=4)
    first = asyncio.create_task(batcher(rows(0)))
    while not model.sizes:                      # the first call is computing (held by the gate)
        await asyncio.sleep(0.001)
    later = [asyncio.create_task(batcher(rows(*values))) for values in ([1], [2, 3], [4], [5, 6], [7])]
    await asyncio.sleep(0.01)
    model.gate.set()
    answers = await asyncio.gather(first, *later)
    # 1 + 2 + 1 images fill the second call (4); [5, 6] would exceed it and wait for the third with [7].
    assert model.sizes == [1, 4, 3]
    for values, answer in zip(([0], [1], [2, 3], [4], [5, 6], [7]), answers, strict=True):
        np.testing.assert_array_equal(answer, rows(*values) * 10)


@pytest.mark.anyio
async def test_a_request_larger_than_the_batch_is_computed_alone():
    model = Recorder()
    model.gate.set()
    np.testing.assert_array_equal(await Batcher(model, max_batch_size=2)(rows(1, 2, 3)), rows(10, 20, 30))
    assert model.sizes == [3]


@pytest.mark.anyio
async def test_a_failing_model_call_fails_only_its_own_callers_and_the_batcher_goes_on():
    model = Recorder(fail_on=2)
    batcher = Batcher(model, max_batch_size=2)
    first = asyncio.create_task(batcher(rows(1)))
    while not model.sizes:
        await asyncio.sleep(0.001)
    in_failing_call = [asyncio.create_task(batcher(rows(value))) for value in (2, 3)]
    after = asyncio.create_task(batcher(rows(4)))
    await asyncio.sleep(0.01)
    model.gate.set()
    np.testing.assert_array_equal(await first, rows(10))
    for task in in_failing_call:
        with pytest.raises(ValueError, match="cannot compute 2"):
            await task
    np.testing.assert_array_equal(await after, rows(40))
    np.testing.assert_array_equal(await batcher(rows(5)), rows(50))


@pytest.mark.anyio
async def test_a_caller_that_gave_up_does_not_stop_the_others():
    model = Recorder()
    batcher = Batcher(model, max_batch_size=4)
    first = asyncio.create_task(batcher(rows(0)))
    while not model.sizes:
        await asyncio.sleep(0.001)
    impatient = asyncio.create_task(batcher(rows(1)))
    patient = asyncio.create_task(batcher(rows(2)))
    await asyncio.sleep(0.01)
    impatient.cancel()
    model.gate.set()
    np.testing.assert_array_equal(await patient, rows(20))
    np.testing.assert_array_equal(await first, rows(0))
    assert impatient.cancelled()
