"""The DAS training step (LM loss + contrastive integration, update-mode soft-masking) against a plain step.

Driven through ``DASStrategy``'s own hooks (``on_train_begin``, ``forward_kwargs``, ``extra_loss``), as
``StrategyTrainer`` drives it: the LM forward's hidden states give z1, then z2 (second dropout view) and
z3 (importance-gated view) are two more forwards of the same weights — no teacher copy.
"""

from __future__ import annotations

import torch

from bench_softmask_step import blocks
from common import Env, Row, free, lm_batch, llama_model, random_importance, ratio_of_peaks


def run(env: Env, shape: str, batch_size: int, seq_len: int) -> list[Row]:
    try:
        from hf_softmask.strategies.das import DASStrategy
    except ImportError as err:
        return [Row("DAS step", shape, "DAS (LM + contrastive)", "plain", float("nan"), float("nan"), note=f"skipped: {err}")]

    model = llama_model(shape, env)
    model.train()
    model.config.use_cache = False
    batch = lm_batch(model.config.vocab_size, batch_size, seq_len, env.device)
    strategy = DASStrategy(show_progress=False)
    strategy.importance = random_importance(model)
    opt_plain = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    opt_das = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)

    def plain_step():
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt_plain.step()
        opt_plain.zero_grad(set_to_none=True)

    def das_step():
        out = model(**batch, **strategy.forward_kwargs(model, batch))
        loss = out.loss + strategy.extra_loss(model, batch, out)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt_das.step()
        opt_das.zero_grad(set_to_none=True)

    from hf_softmask.contrastive import info_nce, masked_mean_pool
    from hf_softmask.gates import UnitGates

    layout = strategy.layout(model)
    imp = strategy.importance
    heads, ffn = imp.heads.to(env.device), imp.ffn.to(env.device)

    def das_step_views_without_grad():
        # Diagnostic, not the library's DAS: z2 and z3 as stop-gradient targets (one forward each, no backward).
        ids, mask = batch["input_ids"], batch["attention_mask"]
        out = model(**batch, output_hidden_states=True)
        z1 = masked_mean_pool(out.hidden_states[-1], mask)
        with torch.no_grad():
            with UnitGates(layout, dropout=strategy._view_dropout):
                z2 = masked_mean_pool(model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1], mask)
            with UnitGates(layout, heads, ffn, dropout=strategy._view_dropout):
                z3 = masked_mean_pool(model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1], mask)
        loss = out.loss + info_nce(z1, z2, z3, strategy.temperature)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt_das.step()
        opt_das.zero_grad(set_to_none=True)

    nothing = lambda: None  # noqa: E731
    attach, detach = (lambda: strategy.on_train_begin(model, opt_das)), (lambda: strategy.on_train_end(model, opt_das))
    variants = {
        "plain": (nothing, plain_step, nothing),
        "DAS (LM + contrastive)": (attach, das_step, detach),
        "z2, z3 without grad": (attach, das_step_views_without_grad, detach),
    }
    warmup, rounds, iters = (1, 2, 2) if env.quick else (2, 3, 5)
    t = blocks(variants, env, warmup, rounds, iters)
    base_ms, _, base_peak = t["plain"]
    ms, spread, peak = t["DAS (LM + contrastive)"]
    rows = [Row("DAS step", shape, "DAS (LM + contrastive)", "plain", ms, base_ms, target="<=2.0x,mem<=1.3x",
                mem_ratio=ratio_of_peaks(peak, base_peak), note=f"batch {batch_size}x{seq_len}, 3 forwards + 1 backward"),
            Row("DAS step", shape, "z2, z3 without grad", "plain", t["z2, z3 without grad"][0], base_ms,
                mem_ratio=ratio_of_peaks(t["z2, z3 without grad"][2], base_peak), note="diagnostic: stop-gradient views")]
    free(model, opt_plain, opt_das, strategy)
    return rows
