"""dlm: diffusion language models in JAX (see README.md)."""
from dlm import host_memory

host_memory.tune()
