#!/usr/bin/env python
"""Continual pre-training over a domain sequence (DAS by default).

    python scripts/continual_pretrain.py --config configs/default.yaml
    python scripts/continual_pretrain.py --model_name_or_path smollm2 --bf16 --gradient_checkpointing --max_steps 4
    accelerate launch scripts/continual_pretrain.py --config configs/default.yaml --output_dir runs/x
    python scripts/continual_pretrain.py --config configs/smollm2_bbc.yaml --strategies ncl,das \
        --learning_rates 1e-4,5e-5

Every field of hf_softmask.continual.ContinualPretrainingArguments (TrainingArguments included) is a flag that
overrides the YAML value; docs/runners.md says what the Trainer flags mean per domain.
"""

import json
import os
import sys
from pathlib import Path

# --help is answered from the stored text (kept current by a test), without importing torch or transformers.
_HELP = Path(__file__).resolve().parents[1] / "hf_softmask" / "continual" / "help" / "continual_pretrain.txt"
if {"-h", "--help"} & set(sys.argv[1:]) and _HELP.is_file():
    sys.stdout.write(_HELP.read_text())
    sys.exit(0)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None):
    from hf_softmask.continual import end_processes, parse_config, run_continual_pretraining

    args = parse_config(argv)
    result = run_continual_pretraining(args)
    keys = ("in_domain_loss", "forgetting", "bwt", "general_loss_increase")
    if result and "runs" not in result and int(os.environ.get("RANK", "0") or 0) == 0:
        print(json.dumps({k: result.get(k) for k in keys}, indent=2))
    end_processes()


if __name__ == "__main__":
    main()
