"""Tools around runs: `bench` (side-by-side costs), `plan` (will it fit: memory predicted from a
model's config, with `activations` measuring what blocks keep for backward), `gather` (sweep
tables), `study` (the damaged-block study). Each runs as ``python -m grass_lightning.tools.<name>``.
"""
