"""Launchers: Cloud TPU VMs and pod slices (`tpu_vm.py`), sweeps (`sweep.py`). Each is a script,
`python launch/<name>.py --help`; the package only lets tests import them."""
