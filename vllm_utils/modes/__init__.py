"""The command line's modes, one pass down: spec (flags) -> plan (resolved once, inputs built once, checks) ->
backend (ours or HF) -> the mode (demo, perf, acc) -> report."""
