#!/usr/bin/env python
"""Continual finetuning on a task sequence with one strategy.

    accelerate launch scripts/continual_finetune.py --config configs/finetune_default.yaml
    python scripts/continual_finetune.py --config configs/finetune_default.yaml --strategy ft --learning_rate 5e-5

Flags after --config override the YAML. Without --config the embedded defaults run (BBC topics on MiniLM, TSS).
docs/runners.md says what the Trainer flags mean per task.
"""

import sys
from pathlib import Path

# --help is answered from the stored text (kept current by a test), without importing torch or transformers.
_HELP = Path(__file__).resolve().parents[1] / "hf_softmask" / "continual" / "help" / "continual_finetune.txt"
if {"-h", "--help"} & set(sys.argv[1:]) and _HELP.is_file():
    sys.stdout.write(_HELP.read_text())
    sys.exit(0)


def main(argv=None):
    from hf_softmask.continual import end_processes
    from hf_softmask.continual.finetune import parse_finetune_config, run_continual_finetune

    args, training_args = parse_finetune_config(argv)
    results = run_continual_finetune(args, training_args)
    if training_args.process_index == 0:
        print({k: results[k] for k in ("acc", "bwt", "fwt", "forgetting")})
    end_processes()


if __name__ == "__main__":
    main()
