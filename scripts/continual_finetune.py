#!/usr/bin/env python
"""Continual finetuning on a task sequence with one strategy.

    accelerate launch scripts/continual_finetune.py --config configs/finetune_default.yaml
    python scripts/continual_finetune.py --config configs/finetune_default.yaml --strategy ft --learning_rate 5e-5

Flags after --config override the YAML. Without --config the embedded defaults run (BBC topics on MiniLM, TSS).
"""

from hf_softmask.continual.finetune import parse_finetune_config, run_continual_finetune


def main(argv=None):
    args, training_args = parse_finetune_config(argv)
    results = run_continual_finetune(args, training_args)
    print({k: results[k] for k in ("acc", "bwt", "fwt", "forgetting")})


if __name__ == "__main__":
    main()
