"""`python -m dlm.convert --src=DIR --out=W [--format=llada|radd] [--param_dtype=float32|bfloat16]
[--tokenizer=DIR]` imports an outside checkpoint into a dlm workdir; `python -m dlm.convert --export=llada --src=W
--out=DIR` writes a dlm workdir in LLaDA's layout. Problems print one line and exit 1."""
import sys

from absl import app, flags

from dlm.errors import DlmError

_SRC = flags.DEFINE_string('src', None, 'source folder (outside checkpoint, or a dlm workdir '
                           'with --export)')
_OUT = flags.DEFINE_string('out', None, 'new output folder (must not exist or be empty)')
_FORMAT = flags.DEFINE_enum('format', None, ['llada', 'radd'], 'source format (default: from '
                            'its config.json)')
_DTYPE = flags.DEFINE_enum('param_dtype', 'float32', ['float32', 'bfloat16'],
                           'dtype of the imported parameters')
_TOKENIZER = flags.DEFINE_string('tokenizer', None, 'tokenizer for the import when --src has '
                                 'none (RADD): a folder with tokenizer.json, or a file')
_EXPORT = flags.DEFINE_enum('export', None, ['llada'], 'export a dlm workdir to this layout')
_EMA = flags.DEFINE_bool('use_ema', True, 'export the EMA parameters when the run kept them')
flags.mark_flags_as_required(['src', 'out'])


def main(argv):
  del argv
  import dlm.convert as convert  # pylint: disable=g-import-not-at-top
  try:
    if _EXPORT.value:
      out = convert.export_llada(_SRC.value, _OUT.value, use_ema=_EMA.value)
    else:
      out = convert.import_checkpoint(_SRC.value, _OUT.value, _FORMAT.value, _DTYPE.value,
                                      _TOKENIZER.value)
  except DlmError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  print(f'wrote {out}')


if __name__ == '__main__':
  app.run(main)
