"""Benchmarks: `python -m dlm.bench.<name>`; each prints a table and, last, one JSON line."""
import json


def print_report(out: dict) -> None:
  """The two-column table of a benchmark's figures, then the same figures as one JSON line."""
  width = max(map(len, out)) + 2
  print(f'{"quantity":{width}s} value')
  for k, v in out.items():
    print(f'{k:{width}s} {v:,.4g}' if isinstance(v, float) else f'{k:{width}s} {v}')
  print(json.dumps(out))
