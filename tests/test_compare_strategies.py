"""compare_strategies: the --quick comparison on a subset of strategies, and the frontier placement rule."""

from __future__ import annotations

import json

import pytest

from hf_softmask.continual.comparison import CompareArguments, frontier_position, run_comparison


def test_frontier_position_rule():
    plain = [
        (3.0, 0.30),
        (3.2, 0.10),
        (3.4, 0.05),
        (3.3, 0.20),
    ]  # (in-domain loss, forgetting); (3.3, 0.2) is dominated
    assert frontier_position((3.1, 0.10), plain, 0.01) == "beyond"  # frontier at 3.1 is 0.20
    assert frontier_position((3.1, 0.20), plain, 0.01) == "on"
    assert frontier_position((3.3, 0.20), plain, 0.01) == "behind"  # (3.2, 0.10) is better on both axes
    assert frontier_position((2.9, 0.25), plain, 0.01) == "beyond"  # at forgetting 0.25 the frontier's loss is 3.05
    assert frontier_position((2.9, 0.40), plain, 0.01) == "undecided"  # needs a plain run at a higher learning rate
    assert frontier_position((3.6, 0.01), plain, 0.01) == "undecided"  # past the lowest-lr end
    assert frontier_position((3.1, float("nan")), plain, 0.01) == "undecided"


@pytest.mark.slow
def test_quick_comparison_writes_records(tmp_path):
    args = CompareArguments(
        output_dir=str(tmp_path),
        quick=True,
        strategies="ncl,hat,tss",
        settings="pretrain,finetune",
        frontier_lr_factors="1,2",
        num_threads=1,
    )
    payload = run_comparison(args)
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["records"] == json.loads(json.dumps(payload["records"]))
    recs = {(r["setting"], r["strategy"], r["learning_rate"]): r for r in saved["records"]}
    assert all(r["error"] is None for r in saved["records"]), [r["error"] for r in saved["records"]]
    # tss declares only "finetune"; ncl runs as "ft" there; ncl and ft also run at 2x lr for the frontiers
    assert sorted(k[:2] for k in recs) == sorted(
        [
            ("pretrain", "ncl"),
            ("pretrain", "ncl"),
            ("pretrain", "hat"),
            ("finetune", "ft"),
            ("finetune", "ft"),
            ("finetune", "hat"),
            ("finetune", "tss"),
        ]
    )
    ft_lrs = sorted(r["learning_rate"] for r in saved["records"] if r["strategy"] == "ft")
    assert ft_lrs[1] == pytest.approx(2 * ft_lrs[0])
    for r in saved["records"]:
        if r["strategy"] == "ft":  # the finetuning runs report their own name, not "ncl"
            assert (
                json.loads((tmp_path / "finetune" / r["run_dir"].split("/")[-1] / "results.json").read_text())[
                    "strategy_config"
                ]["name"]
                == "ft"
            )
        if not r.get("frontier"):
            assert r["frontier_position"] in {"beyond", "on", "behind", "undecided"}
    for r in saved["records"]:
        assert r["wall_seconds"] > 0 and r["peak_rss_mb"] > 100
        if r["setting"] == "pretrain":
            assert r["final_perplexity"] == pytest.approx(2.718281828 ** r["final_mean_loss"])
            assert r["forgetting"] is not None and r["bwt"] is not None
        else:
            assert 0 <= r["acc"] <= 1 and len(r["accuracy_matrix"]) == 2
    hat = next(r for r in saved["records"] if r["setting"] == "pretrain" and r["strategy"] == "hat")
    assert hat["frontier_position"] in {"beyond", "on", "behind", "undecided"}
    assert hat["forgetting"] == pytest.approx(0.0, abs=1e-6)  # each domain evaluated under its own frozen mask
    assert sum(1 for r in saved["records"] if r.get("frontier")) == 4
    assert all(0 <= r["in_task_error"] <= 1 for r in saved["records"] if r["setting"] == "finetune")
    md = (tmp_path / "comparison.md").read_text()
    assert "| hat |" in md and "| tss |" in md and "frontier run" in md and "vs ft frontier" in md


def test_finetuning_defaults_are_read_from_the_shipped_configs():
    """The comparison used to copy TSS's and WSN's settings out of configs/finetune_*.yaml by hand; now it reads
    them, so the two cannot drift apart."""
    import yaml

    from hf_softmask.continual.comparison import FINETUNE_LR, STRATEGY_DEFAULTS
    from hf_softmask.utils.package_data import config_file

    for name in ("finetune_default", "finetune_wsn"):
        data = yaml.safe_load(config_file(name).read_text())
        assert STRATEGY_DEFAULTS["finetune"][data["strategy"]] == data["strategy_kwargs"]
        assert FINETUNE_LR[data["strategy"]] == data["learning_rate"]
