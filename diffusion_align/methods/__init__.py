"""The methods: the training strategies (`strategies/`, one file per paper, shared glue in
`strategies/sampling.py`) and the inference-time ones (`reno`, `search`), written against the engine and
the math; `distributed` tells strategies about the other processes."""
