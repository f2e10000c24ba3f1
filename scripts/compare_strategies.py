#!/usr/bin/env python
"""Every strategy on the same domain sequence (continual pre-training) and task sequence (continual finetuning).

    python scripts/compare_strategies.py --output_dir runs/compare
    python scripts/compare_strategies.py --output_dir /tmp/cmp --quick --strategies ncl,hat,talos
    python scripts/compare_strategies.py --output_dir runs/cmp --settings pretrain \\
        --pretrain_overrides '{"max_steps_per_domain": 20}'

Writes DIR/comparison.json (one record per strategy and setting) and DIR/comparison.md; each run's own files are
under DIR/<setting>/<strategy>/. Every field of hf_softmask.comparison.CompareArguments is a flag.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import HfArgumentParser

from hf_softmask.comparison import CompareArguments, run_comparison


def main():
    (args,) = HfArgumentParser(CompareArguments).parse_args_into_dataclasses()
    payload = run_comparison(args)
    print(open(os.path.join(args.output_dir, "comparison.md")).read())
    failed = [r for r in payload["records"] if r["error"]]
    if failed:
        print(f"{len(failed)} run(s) failed; see {args.output_dir}/<setting>/<strategy>.error.txt")


if __name__ == "__main__":
    main()
