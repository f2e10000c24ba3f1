#!/usr/bin/env python
"""Continual pre-training over a domain sequence (DAS by default).

    python scripts/continual_pretrain.py --config configs/default.yaml
    accelerate launch scripts/continual_pretrain.py --config configs/default.yaml --output_dir runs/x
    python scripts/continual_pretrain.py --config configs/smollm2_bbc.yaml --strategies ncl,das --learning_rates 1e-4,5e-5,2.5e-5

Every field of hf_softmask.continual.ContinualPretrainingArguments is a flag that overrides the YAML value.
"""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hf_softmask.continual import parse_config, run_continual_pretraining


def main():
    args = parse_config()
    result = run_continual_pretraining(args)
    keys = ("in_domain_loss", "forgetting", "bwt", "general_loss_increase")
    if result and "runs" not in result:
        print(json.dumps({k: result.get(k) for k in keys}, indent=2))


if __name__ == "__main__":
    main()
