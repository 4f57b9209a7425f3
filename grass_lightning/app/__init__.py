"""The application behind ``python train.py``: one fine-tuning run from a Hydra config.

`run` (``train(cfg)``), `methods` (full, LoRA, LISA, GRASS), `models`, `assets` (offline
weights), `sources` (data), `tasks` (loss and score), `datamodule`, `module` (FineTuningModule),
`export` (the fine-tuned model as a Hugging Face folder).
"""
