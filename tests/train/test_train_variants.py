"""Every named variant trains on both embedded corpora and reports the MoE metrics."""

from __future__ import annotations

import pytest

from evil_moe.recipes import train_and_evaluate
from evil_moe.study.claims import load_claims
from evil_moe.study.spec import REFERENCE_METHODS
from evil_moe.train.config import load_config
from evil_moe.train.variants import VARIANTS


def test_every_claim_names_known_variants():
    _, claims = load_claims()
    known = set(VARIANTS) | set(REFERENCE_METHODS)
    assert {c.variant for c in claims} | {c.reference for c in claims} <= known


@pytest.mark.parametrize("corpus", ["bilingual", "hacks"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_runs(variant, corpus, tiny_overrides):
    overrides = [*tiny_overrides, f"variant={variant}", f"data.corpus={corpus}"]
    overrides += ["data.hack_samples=300", "model.vocab_size=300", "train.batch_size=8"]
    overrides += ["train.steps=4"]
    cfg = load_config(None, overrides)
    result = train_and_evaluate(cfg, progress=False)
    m = result.metrics.to_dict()
    assert m["variant"] == variant
    spec = m["specialization"]
    assert spec["n_experts"] == cfg.model.n_experts
    rows = spec["ablation"]["rows"]
    assert rows[0] == "retain"
    if corpus == "hacks":
        assert {"hardcode_outputs", "special_case_tests", "skip_checks", "always_equal"} <= set(
            rows
        )
    routed = cfg.model.router.policy != "all" or cfg.model.router.amplify
    assert (spec["routing"] is not None) == routed
    if routed and cfg.model.router.policy != "all":
        assert len(spec["routing"]["load"]) == cfg.model.n_experts
        assert spec["routing"]["routed_tokens"] > 0
        assert m["parameters"]["router_controlled"] > 0
    assert spec["cancellation"]["mean"] >= 1.0 - 1e-9
    assert "loss_spikes" in m["stability"]
    assert ("router_logit_scale" in m["stability"]) == cfg.model.gate.enabled
    quarantine = m["parameters"]["quarantine"]
    assert quarantine > 0


def test_variants_keep_quarantine_parameters_equal(tiny_overrides):
    from evil_moe.models.testbed import Testbed

    counts = {}
    for variant in VARIANTS:
        cfg = load_config(None, [f"variant={variant}"])
        model = Testbed(cfg.model)
        gate = sum(p.numel() for n, p in model.named_parameters() if ".gate." in n)
        counts[variant] = model.num_parameters()["quarantine"] - gate
    assert len(set(counts.values())) == 1, counts
