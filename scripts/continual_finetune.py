#!/usr/bin/env python
"""Continual finetuning on a task sequence with one strategy: ``hf-softmask finetune``, from a checkout.

    accelerate launch scripts/continual_finetune.py --config configs/finetune_default.yaml
    python scripts/continual_finetune.py --config configs/finetune_default.yaml --strategy ft --learning_rate 5e-5

Flags after --config override the YAML. Without --config the embedded defaults run (BBC topics on MiniLM, TSS).
docs/runners.md says what the Trainer flags mean per task.
"""

import sys

from hf_softmask.command_line import main as _command


def main(argv=None):
    return _command(["finetune", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
