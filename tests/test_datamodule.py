"""The training order resumes exactly from a loader state taken anywhere, epochs after it included."""

import pytest
from torchdata.stateful_dataloader import StatefulDataLoader

from grass_lightning.app.datamodule import EpochShuffle


def _loader():
    return StatefulDataLoader(dataset=list(range(10)), batch_size=3, sampler=EpochShuffle(10, seed=7))


def _batches(loader, epochs):
    return [batch.tolist() for _ in range(epochs) for batch in loader]


@pytest.mark.parametrize("stop_after", [1, 3, 4, 5, 9])  # mid-epoch, at an epoch's end, in a later epoch
def test_resumed_loader_yields_what_an_uninterrupted_one_does(stop_after):
    straight = _batches(_loader(), 4)
    first, seen = _loader(), []
    while len(seen) < stop_after:
        for batch in first:
            seen.append(batch.tolist())
            if len(seen) == stop_after:
                break
    state = first.state_dict()
    resumed = _loader()
    resumed.load_state_dict(state)
    rest = [batch.tolist() for batch in resumed] + _batches(resumed, 3)
    assert (seen + rest)[: len(straight)] == straight
    assert straight[:4] != straight[4:8]  # every epoch has its own order
