#!/usr/bin/env python
"""Every strategy on the same domain sequence (continual pre-training) and task sequence (continual finetuning):
``hf-softmask compare``, from a checkout.

    python scripts/compare_strategies.py --output_dir runs/compare
    python scripts/compare_strategies.py --output_dir /tmp/cmp --quick --strategies ncl,hat,talos
    python scripts/compare_strategies.py --output_dir runs/cmp --settings pretrain \\
        --pretrain_overrides '{"max_steps": 20}'

Writes DIR/comparison.json (one record per strategy and setting) and DIR/comparison.md; each run's own files are
under DIR/<setting>/<strategy>/. Every field of hf_softmask.continual.comparison.CompareArguments is a flag.
"""

import sys

from hf_softmask.command_line import main as _command


def main(argv=None):
    return _command(["compare", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
