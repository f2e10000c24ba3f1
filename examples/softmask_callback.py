"""Soft-mask a plain Trainer run: importance on general text, then train on news with important units protected.

    python examples/softmask_callback.py [--max_steps 20] [--output_dir runs/example]

Runs offline on the shipped MiniLM and BBC News; any supported model works the same.
"""

import argparse

import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer, Trainer, TrainingArguments

from hf_softmask import SoftMaskCallback, compute_importance
from hf_softmask.data import build_lm_dataset, general_text_documents, lm_data_collator, load_bbc_topics
from hf_softmask.utils.assets import minilm_path


def main(max_steps: int = 20, output_dir: str = "runs/example"):
    tok = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModelForMaskedLM.from_pretrained(minilm_path())
    collate = lm_data_collator(tok, mlm=True)

    # Importance of every head and FFN neuron for general text: heads [L, H], FFN [L, I], values in [0, 1].
    general = build_lm_dataset(general_text_documents(20), tok, block_size=128, max_blocks=32)
    loader = torch.utils.data.DataLoader(general, batch_size=8, collate_fn=collate)
    importance = compute_importance(model, loader, objective="kl_dropout")
    importance.save_pretrained(f"{output_dir}/importance")  # safetensors + json; UnitImportance.from_pretrained

    # Train on one news topic; the optimizer's update of each unit's weights is scaled by 1 - importance.
    news = build_lm_dataset(load_bbc_topics(["tech"])["tech"][:100], tok, block_size=128)
    args = TrainingArguments(output_dir, learning_rate=1e-4, weight_decay=0.01, max_steps=max_steps, report_to=[])
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=news,
        data_collator=collate,
        callbacks=[SoftMaskCallback(importance, mode="update")],
    )
    trainer.train()
    return model, importance


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max_steps", type=int, default=20)
    parser.add_argument("--output_dir", default="runs/example")
    main(**vars(parser.parse_args()))
