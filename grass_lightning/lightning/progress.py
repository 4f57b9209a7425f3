"""GrassProgressBar: Lightning's TQDM bar with what the last step trained, ``active=3,17``
(``active=probe`` while probing).

The callback logs only numbers, so it puts nothing on a stock bar (a float per active slot read
as ``active_0=3.000``); this bar reads the callback instead.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar
from typing_extensions import override

from grass_lightning.lightning.callback import GrassCallback


class GrassProgressBar(TQDMProgressBar):
    @override
    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        for callback in trainer.callbacks:
            if isinstance(callback, GrassCallback) and callback.last_step is not None:
                probed, blocks = callback.last_step
                items["active"] = "probe" if probed else ",".join(map(str, blocks))
        return items
