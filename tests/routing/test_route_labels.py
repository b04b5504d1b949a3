"""One parser of route labels (codes or names, [B] or [B, T], tensors / lists / numpy) and
one Method enum that knows its routing semantics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evil_moe.models import testbed as tb
from evil_moe.routing.labels import (
    ROUTE_NAMES,
    SEMANTICS,
    Method,
    RouteLabel,
    broadcast_per_token,
    make_plan,
    parse_route_labels,
)

CODES = torch.tensor([1, 0, 2])
NAMES = ["forget", "retain", "unlabeled"]


def test_route_label_names_and_codes():
    assert [label.label for label in RouteLabel] == ["retain", "forget", "unlabeled"]
    assert ROUTE_NAMES == {"retain": 0, "forget": 1, "unlabeled": 2}
    assert RouteLabel.parse("forget") is RouteLabel.FORGET
    assert RouteLabel.parse(2) is RouteLabel.UNLABELED
    assert RouteLabel.parse(np.int64(0)) is RouteLabel.RETAIN
    for bad, match in [("Forget", "unknown route label"), (3, "must be 0"), (True, "code")]:
        with pytest.raises(ValueError, match=match):
            RouteLabel.parse(bad)


@pytest.mark.parametrize(
    "labels",
    [
        CODES,
        CODES.int(),
        CODES.tolist(),
        tuple(CODES.tolist()),
        NAMES,
        np.array(NAMES),
        CODES.numpy(),
        [RouteLabel.FORGET, "retain", 2],
        [torch.tensor(1), np.int64(0), "unlabeled"],
    ],
)
def test_every_form_parses_to_the_same_codes(labels):
    got = parse_route_labels(labels)
    assert got.dtype == torch.long and torch.equal(got, CODES)


def test_per_sequence_labels_broadcast_over_the_sequence():
    per_token = CODES[:, None].expand(3, 4)
    assert torch.equal(parse_route_labels(NAMES, (3, 4)), per_token)
    assert torch.equal(parse_route_labels(per_token.tolist(), (3, 4)), per_token)
    assert torch.equal(parse_route_labels("forget", (3, 4)), torch.ones(3, 4, dtype=torch.long))
    assert torch.equal(parse_route_labels([["retain", "forget"]], (1, 2)), torch.tensor([[0, 1]]))


@pytest.mark.parametrize(
    "labels, match",
    [
        (["forget", "bad"], "unknown route label 'bad'"),
        ([0, 3], r"must be 0 \(retain\), 1 \(forget\) or 2 \(unlabeled\), got 3"),
        (torch.tensor([-1, 0]), "got -1"),
        (torch.tensor([0.0, 1.0]), "integer codes or names, got a torch.float32 tensor"),
        (torch.tensor([True]), "torch.bool"),
        ([0.0, 1.0], "code or a name, got 0.0"),
        ([[0, 1], [2]], "route labels"),
        (None, "code or a name, got None"),
    ],
)
def test_bad_labels_say_what_is_wrong(labels, match):
    with pytest.raises(ValueError, match=match):
        parse_route_labels(labels)


def test_bad_shapes_name_both_accepted_shapes():
    with pytest.raises(ValueError, match=r"route labels of shape \(2,\) match neither"):
        parse_route_labels([0, 1], (3, 4))
    with pytest.raises(ValueError, match=r"per-token \[B, T\]=\(3, 4\)"):
        parse_route_labels(torch.zeros(3, 5, dtype=torch.long), (3, 4))
    with pytest.raises(ValueError, match="must be \\[B, T\\]"):
        broadcast_per_token(CODES, (3,))


def test_parsed_labels_go_to_the_device_asked_for():
    assert parse_route_labels(NAMES, (3, 2), "meta").device.type == "meta"


def test_methods_know_their_semantics():
    assert [m.value for m in Method] == [
        "none",
        "filter",
        "sgtm",
        "gradient_routing",
        "demix",
        "demix_masked",
    ]
    assert SEMANTICS == (
        Method.NONE,
        Method.SGTM,
        Method.GRADIENT_ROUTING,
        Method.DEMIX,
        Method.DEMIX_MASKED,
    )
    assert Method("filter").semantics is Method.NONE and not Method.FILTER.routed
    assert Method.SGTM.semantics is Method.SGTM and Method.DEMIX.routed
    assert Method.SGTM == "sgtm" and f"{Method.GRADIENT_ROUTING}" == "gradient_routing"
    assert Method.parse("demix") is Method.DEMIX
    with pytest.raises(ValueError, match="unknown routing semantics 'filter'"):
        Method.parse("filter", SEMANTICS, "routing semantics")
    with pytest.raises(ValueError, match="unknown method 'SGTM'"):
        Method.parse("SGTM")


def test_make_plan_takes_names_and_methods():
    by_code = make_plan(CODES, "sgtm")
    by_name = make_plan(NAMES, Method.SGTM)
    assert by_name.semantics is Method.SGTM
    assert torch.equal(by_code.shared_grad, by_name.shared_grad)
    assert torch.equal(by_code.quarantine_on, by_name.quarantine_on)


def test_testbed_takes_sequence_labels_and_names():
    cfg = tb.TestbedConfig(
        vocab_size=32, seq_len=6, d_model=8, n_layer=1, n_head=2, mlp_width=16, quarantine_width=4
    )
    torch.manual_seed(0)
    model = tb.Testbed(cfg).double()
    tokens = torch.randint(0, 32, (3, 6), generator=torch.Generator().manual_seed(1))

    def grads(route):
        model.zero_grad(set_to_none=True)
        tb.lm_loss(model(tokens, route=route), tokens, reduction="sum").backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    reference = grads(CODES[:, None].expand(3, 6))
    for route in (CODES, NAMES, np.array(NAMES)):
        got = grads(route)
        for name in reference:
            assert torch.equal(got[name], reference[name]), name
    with pytest.raises(ValueError, match=r"route of shape \(2,\)"):
        model(tokens, route=[0, 1])
