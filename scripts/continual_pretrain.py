#!/usr/bin/env python
"""Continual pre-training over a domain sequence (DAS by default): ``hf-softmask pretrain``, from a checkout.

    python scripts/continual_pretrain.py --config configs/default.yaml
    python scripts/continual_pretrain.py --model_name_or_path smollm2 --bf16 --gradient_checkpointing --max_steps 4
    accelerate launch scripts/continual_pretrain.py --config configs/default.yaml --output_dir runs/x
    python scripts/continual_pretrain.py --config configs/smollm2_bbc.yaml --strategies ncl,das \
        --learning_rates 1e-4,5e-5

Every field of hf_softmask.continual.ContinualPretrainingArguments (TrainingArguments included) is a flag that
overrides the YAML value; docs/runners.md says what the Trainer flags mean per domain.
"""

import sys

from hf_softmask.command_line import main as _command


def main(argv=None):
    return _command(["pretrain", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
