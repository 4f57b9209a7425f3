"""GrassProgressBar: Lightning's TQDM bar with the active blocks as one item, ``active=3,17``.

GrassCallback can only log numbers, one per active slot; read as floats they show as
``active_0=3.000, active_1=17.000``.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar
from typing_extensions import override

from grass_lightning.callback import ACTIVE_SLOT


class GrassProgressBar(TQDMProgressBar):
    @override
    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        slots = sorted((k for k in items if k.startswith(ACTIVE_SLOT)), key=lambda k: int(k[len(ACTIVE_SLOT):]))
        if slots:
            items["active"] = ",".join(str(int(items.pop(k))) for k in slots)
        return items
