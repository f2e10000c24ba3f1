"""Per-block loss spread of SmolLM2-135M on the five BBC topics (256-token blocks), before and after a few steps
on one topic; what it implies for the evaluation-token budget of a +-0.01-nat interval (docs/baselines.md,
appendix). Run from the repository root::

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 python benchmarks/block_spread.py
"""

import json
import time

import numpy as np
import torch

from hf_softmask.continual.pretraining.evaluation import FixedEvalSet
from hf_softmask.data import build_lm_dataset, lm_data_collator, load_domains
from hf_softmask.evaluation.bootstrap import block_losses, blocks_for_halfwidth
from hf_softmask.utils.assets import load_smollm2


def main():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    t0 = time.time()
    model, tok = load_smollm2()
    model.eval()
    topics = ["business", "entertainment", "politics", "sports", "tech"]
    doms = load_domains(topics, max_train_docs=40, max_eval_docs=20, eval_fraction=0.1, seed=42)
    coll = lm_data_collator(tok, mlm=False)
    evals = [FixedEvalSet(d.name, build_lm_dataset(d.eval_texts, tok, 256, 8), coll, 4) for d in doms]
    base = [np.array(block_losses(model, ev, causal=True)[0]) for ev in evals]
    print("base eval", round(time.time() - t0), "s", flush=True)
    train = build_lm_dataset(doms[0].train_texts, tok, 256, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    model.train()
    for step in range(4):
        batch = coll([train[i] for i in range(2 * step, 2 * step + 2)])
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = [np.array(block_losses(model, ev, causal=True)[0]) for ev in evals]
    out = {"seconds": round(time.time() - t0), "domains": {}}
    for name, b, a in zip(topics, base, after):
        d = a - b
        out["domains"][name] = {
            "blocks": len(b),
            "mean_loss": float(b.mean()),
            "block_sd": float(b.std(ddof=1)),
            "mean_change": float(d.mean()),
            "diff_sd": float(d.std(ddof=1)),
            "budget_loss": blocks_for_halfwidth(b, 0.01, tokens_per_block=255),
            "budget_diff": blocks_for_halfwidth(d, 0.01, tokens_per_block=255),
        }
    out["budget_in_domain_mean_of_5"] = blocks_for_halfwidth(base, 0.01, tokens_per_block=255)
    out["budget_paired_in_domain_mean_of_5"] = blocks_for_halfwidth(
        [a - b for a, b in zip(after, base)], 0.01, tokens_per_block=255
    )
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
