"""The algorithm in plain PyTorch, usable and testable without Lightning.

`blocks` finds the blocks; `importance` measures them; `probe` measures all of them cheaply at
the start; `sampling` turns importance into an active set; `active_set` freezes the rest and
handles idle Adam moments; `offload` moves block moments between device and host; `schedule`
runs these step by step; `sharding` shards blocks with FSDP2 and finds where their gradients
arrive; `config` holds the hyper-parameters.
"""
