"""Verifiable tasks for RL post-training: generators, prompts, safe rewards, eval parsers.

Plain Python on the host (no JAX): rewards run on decoded text between device steps.
  countdown       Countdown (SPEC §6.1); `countdown.reward` is the DESIGN §3 contract
  countdown_tfds  the Countdown generator as a tfds data source (array_record) for grain
  sudoku          4×4 Sudoku (SPEC §6.2), split by solution grid
"""
