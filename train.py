"""Fine-tune with GRASS (or full, LoRA, LISA) from the Hydra configs in conf/.

    python train.py                                   # MiniLM-L6 on SST-2 with GRASS
    python train.py model=smollm2 data=piqa method=lisa
    python train.py -m method=full,lora,lisa,grass seed=0,1,2
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from grass_lightning.app.run import train
from grass_lightning.app.setup import check_objective, configure_console, register_method_defaults

register_method_defaults()  # conf/method's YAML files take each method's defaults from its dataclass


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    configure_console()
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        check_objective(cfg)  # before any training: a sweep needs a validation score to choose on
    metrics, objects = train(cfg)
    objects.release()  # a multirun trains its next job in this process
    return metrics["val_score"]  # what a sweeper optimizes: the validation score, never the test score


if __name__ == "__main__":
    main()
