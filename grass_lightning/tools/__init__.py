"""Tools around runs: `bench` (side-by-side costs), `gather` (sweep tables), `heatmap` (the
importance picture), `study` (the damaged-block study). Each runs as ``python -m grass_lightning.<name>``.
"""
