"""Quarantine experts on tiny random Hugging Face models (Llama, Qwen2, GPT-2), offline.

Exactness tests run in float64 and compare ONE mixed-batch backward against a slow
reference made of separate backward passes per sequence (SGTM paper's per-group rule):

* retain sequences: the deployed model (``handle.ablated()``), so the quarantine gets nothing;
* unlabeled sequences: an ordinary forward/backward;
* forget sequences: an ordinary forward/backward whose shared-parameter gradients are
  dropped; with a top-k router the quarantine gradient of each token is rebuilt by hand
  for its best-aligned expert only, from the layer inputs and output cotangents captured
  in that ordinary pass (independent of the router implementation).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

transformers = pytest.importorskip("transformers")

from evil_moe.models.adapters import QuarantineLayer, QuarantineLinear  # noqa: E402
from evil_moe.models.hf import (  # noqa: E402
    CONFIG_NAME,
    get_handle,
    inject,
    load_quarantine,
    route_labels,
)
from evil_moe.modules.ablation import quarantine_parameters  # noqa: E402
from evil_moe.routing.routers import RouterConfig  # noqa: E402

RETAIN, FORGET, UNLABELED = 0, 1, 2
VOCAB = 128
ARCHS = ("llama", "qwen2", "gpt2")


def tiny_config(arch: str, hidden: int = 32):
    if arch == "llama":
        return transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        )  # fmt: skip
    if arch == "qwen2":
        return transformers.Qwen2Config(
            vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        )  # fmt: skip
    return transformers.GPT2Config(
        n_embd=hidden, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip


def base_model(arch: str, seed: int = 0, dtype=torch.float64, hidden: int = 32):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, hidden))
    return model.to(dtype)


def make(arch: str, seed: int = 0, randomize: bool = True, scale: float = 0.3, **kwargs):
    """A tiny float64 model with quarantine experts whose adapter weights are random.

    Random ``down`` matrices (zero at init) make every adapter gradient generic, so a
    missing or extra term cannot hide behind a zero.
    """
    model = base_model(arch, seed)
    kwargs.setdefault("n_quarantine", 2)
    kwargs.setdefault("rank", 2)
    handle = inject(model, **kwargs)
    if randomize:
        gen = torch.Generator().manual_seed(seed + 99)
        with torch.no_grad():
            for layer in handle.layers.values():
                for p in list(layer.experts.parameters()) + (
                    list(layer.shared.parameters()) if layer.shared is not None else []
                ):
                    p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model, handle


def batch(n: int = 4, t: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, t), generator=gen)
    targets = torch.randint(0, VOCAB, (n, t), generator=gen)
    return ids, targets


def loss_sum(model, ids, targets, **kwargs):
    logits = model(input_ids=ids, **kwargs).logits
    return F.cross_entropy(logits.reshape(-1, VOCAB).float(), targets.reshape(-1), reduction="sum")


def grads(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {
        n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def shared_names(handle) -> set[str]:
    quarantine = set(quarantine_parameters(handle.model))
    return {n for n, p in handle.model.named_parameters() if p.requires_grad} - quarantine


# ----------------------------------------------------------------------------- identity


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["lora", "mlp"])
def test_identity_at_init(arch, kind):
    model = base_model(arch, dtype=torch.float32)
    ids, _ = batch()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    handle = inject(model, n_quarantine=4, rank=2, kind=kind, shared_expert=True, train_base=True)
    assert handle.layers
    route = torch.tensor([RETAIN, FORGET, UNLABELED, FORGET])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)
        assert torch.equal(model(input_ids=ids, route_labels=route).logits, ref)
    assert all(p.requires_grad for p in model.parameters())


def test_frozen_base_only_adapters_train():
    model = base_model("llama")
    handle = inject(model, n_quarantine=2, rank=2, shared_expert=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(".experts." in n or ".shared." in n for n in trainable)
    counts = handle.num_parameters()
    assert counts["trainable"] == counts["quarantine"] + counts["shared_expert"]


# ----------------------------------------------------------------------------- isolation


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["lora", "mlp"])
def test_isolation_per_route_label(arch, kind):
    model, handle = make(arch, kind=kind, shared_expert=2, train_base=True)
    ids, targets = batch(2)
    quarantine = set(quarantine_parameters(model))

    g = grads(model, loss_sum(model, ids, targets, route_labels=torch.tensor([FORGET] * 2)))
    for n in shared_names(handle):
        assert torch.count_nonzero(g[n]) == 0, f"forget tokens wrote into shared {n}"
    assert all(g[n].abs().sum() > 0 for n in quarantine)

    g = grads(model, loss_sum(model, ids, targets, route_labels=torch.tensor([RETAIN] * 2)))
    for n in quarantine:
        assert torch.count_nonzero(g[n]) == 0, f"retain tokens wrote into quarantine {n}"
    assert all(g[n].abs().sum() > 0 for n in shared_names(handle) if "wpe" not in n)

    g = grads(model, loss_sum(model, ids, targets, route_labels=torch.tensor([UNLABELED] * 2)))
    assert all(g[n].abs().sum() > 0 for n in quarantine)


def _capture(handle):
    """Record each quarantine layer's input and output cotangent in the next pass."""
    seen: dict[str, dict[str, torch.Tensor]] = {}
    hooks = []
    for name, layer in handle.layers.items():

        def fwd(module, args, out, name=name):
            seen[name] = {"x": args[0].detach().reshape(-1, args[0].shape[-1])}
            out.register_hook(lambda g: seen[name].__setitem__("g", g.reshape(-1, g.shape[-1])))

        hooks.append(layer.register_forward_hook(fwd))
    return seen, hooks


def _expert_grads(layer: QuarantineLayer, x, g, policy: str):
    """Quarantine gradients of tokens (x, g), each sent to the experts ``policy`` picks."""
    experts = layer.experts
    params = dict(experts.quarantine_parameters())
    with torch.enable_grad():
        pre = F.linear(x, params["up"], params.get("up_bias"))
        h = experts.act(pre)
        n, k = h.shape[0], experts.n_experts
        hk = h.view(n, k, -1)
        per_expert = torch.einsum("nkw,dkw->nkd", hk, params["down"].view(-1, k, hk.shape[2]))
        y = per_expert.sum(1)
        if policy == "all":
            keep = torch.ones(n, k, dtype=h.dtype)
        else:  # top-1 backward alignment: -<g, y_k> / (|g| |y|), plus harmful experts
            score = -(per_expert * g[:, None, :]).sum(-1)
            score = score / (g.norm(dim=1, keepdim=True) * y.norm(dim=1, keepdim=True) + 1e-12)
            keep = F.one_hot(score.argmax(1), k).to(h.dtype)
            keep = torch.maximum(keep, (score < 0).to(h.dtype))
        masked = (hk * keep[:, :, None]).view(n, -1)
        out = F.linear(masked, params["down"])
        grads_ = torch.autograd.grad((out * g).sum(), list(params.values()))
    return {f"{layer.layer_name}.experts.{p}": v for p, v in zip(params, grads_, strict=True)}


def slow_reference(model, handle, ids, targets, labels, policy="all"):
    """Per-sequence SGTM reference (see the module docstring)."""
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    shared = shared_names(handle)
    for i, label in enumerate(labels):
        tok, tgt = ids[i : i + 1], targets[i : i + 1]
        if label == RETAIN:
            with handle.ablated():
                g = grads(model, loss_sum(model, tok, tgt))
        elif label == UNLABELED:
            g = grads(model, loss_sum(model, tok, tgt))
        else:
            seen, hooks = _capture(handle)
            g = grads(model, loss_sum(model, tok, tgt))
            for h in hooks:
                h.remove()
            g = {n: torch.zeros_like(v) if n in shared else v for n, v in g.items()}
            if policy != "all":
                for name, layer in handle.layers.items():
                    g.update(_expert_grads(layer, seen[name]["x"], seen[name]["g"], policy))
        for n in total:
            total[n] += g.get(n, 0)
    return total


@pytest.mark.parametrize(
    ("arch", "kind", "train_base", "shared"),
    [
        ("llama", "lora", True, 2),
        ("qwen2", "lora", False, 2),
        ("gpt2", "lora", True, 0),
        ("llama", "mlp", True, 4),
        ("gpt2", "mlp", False, 4),
    ],
)
def test_mixed_batch_matches_per_sequence_reference(arch, kind, train_base, shared):
    model, handle = make(arch, kind=kind, shared_expert=shared, train_base=train_base)
    labels = [FORGET, RETAIN, UNLABELED, FORGET, RETAIN]
    ids, targets = batch(len(labels), seed=3)
    fast = grads(model, loss_sum(model, ids, targets, route_labels=torch.tensor(labels)))
    slow = slow_reference(model, handle, ids, targets, labels)
    for n in fast:
        assert_close(fast[n], slow[n], rtol=1e-9, atol=1e-10, msg=n)


@pytest.mark.parametrize(("arch", "kind"), [("llama", "lora"), ("gpt2", "lora"), ("qwen2", "mlp")])
def test_topk_router_sends_each_token_to_its_expert(arch, kind):
    model, handle = make(
        arch, kind=kind, n_quarantine=4, router="topk", shared_expert=2, train_base=True
    )
    labels = [FORGET, UNLABELED, RETAIN, FORGET]
    ids, targets = batch(len(labels), seed=5)
    fast = grads(model, loss_sum(model, ids, targets, route_labels=torch.tensor(labels)))
    slow = slow_reference(model, handle, ids, targets, labels, policy="topk")
    for n in fast:
        assert_close(fast[n], slow[n], rtol=1e-8, atol=1e-10, msg=n)
    loads = [r.load for r in handle.routers.values()]
    assert loads and all(float(load.sum()) == 2 * ids.shape[1] for load in loads)


def test_topk_single_token_reaches_only_its_expert():
    top1 = RouterConfig(policy="topk", correct_harmful=False)
    model, handle = make("llama", n_quarantine=4, router=top1, target_modules=["down_proj"])
    ids, targets = batch(1, t=6, seed=7)
    route = torch.full((1, 6), RETAIN)
    route[0, 3] = FORGET
    g = grads(model, loss_sum(model, ids, targets, route_labels=route))
    for name, layer in handle.layers.items():
        up = g[f"{name}.experts.up"]
        touched = [k for k in range(4) if up[layer.experts.expert_slice(k)].abs().sum() > 0]
        assert len(touched) == 1, (name, touched)
        chosen = int(handle.routers[name].load.argmax())
        assert touched == [chosen]


# ----------------------------------------------------------------------------- labels


def test_sequence_labels_broadcast_and_context_equals_batch_key():
    model, handle = make("qwen2", shared_expert=2, train_base=True)
    ids, targets = batch(3)
    seq = torch.tensor([FORGET, RETAIN, UNLABELED])
    tok = seq[:, None].expand(3, ids.shape[1])
    a = grads(model, loss_sum(model, ids, targets, route_labels=seq))
    b = grads(model, loss_sum(model, ids, targets, route_labels=tok))
    with route_labels(model, ["forget", "retain", "unlabeled"]):
        loss = loss_sum(model, ids, targets)
    c = grads(model, loss)  # backward outside the block: the plan stays set
    for n in a:
        assert torch.equal(a[n], b[n]) and torch.equal(a[n], c[n]), n
    assert handle.state.pending == []
    # the next forward without labels clears the plan
    model(input_ids=ids)
    assert handle.state.plan.semantics == "none"


def test_bad_label_shapes_raise():
    model, handle = make("llama")
    ids, _ = batch(2)
    with pytest.raises(ValueError, match="route_labels of shape"):
        model(input_ids=ids, route_labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="route labels must be 0"):
        model(input_ids=ids, route_labels=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="no quarantine"):
        route_labels(base_model("gpt2"), [0])
    assert get_handle(handle) is handle


def test_gradient_routing_semantics_detaches_shared_outputs():
    model, _ = make("llama", semantics="gradient_routing", shared_expert=2)
    ids, targets = batch(2)
    g = grads(model, loss_sum(model, ids, targets, route_labels=torch.tensor([FORGET] * 2)))
    # forget tokens reach the shared experts only through later quarantine paths, never
    # through the layer's own shared output; the quarantine still learns
    assert all(g[n].abs().sum() > 0 for n in quarantine_parameters(model))
    g_none = grads(model, loss_sum(model, ids, targets))
    shared = [n for n in g if ".shared." in n]
    assert any(not torch.allclose(g[n], g_none[n]) for n in shared)


# ----------------------------------------------------------------------------- ablation


def test_ablation_scale_disable_round_trip():
    model, handle = make("llama", n_quarantine=3, shared_expert=2)
    ids, _ = batch(2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        full = model(input_ids=ids).logits
        with handle.ablated():
            gone = model(input_ids=ids).logits
        with handle.scaled(0.0):
            assert torch.equal(model(input_ids=ids).logits, gone)
        with handle.scaled(1.0):
            assert torch.equal(model(input_ids=ids).logits, full)
        with handle.scaled(0.5):
            half = model(input_ids=ids).logits
        with handle.disabled():
            bare = model(input_ids=ids).logits
        with handle.ablated(experts=[0, 1, 2]):
            assert_close(model(input_ids=ids).logits, gone)
        with handle.ablated(experts=[1]):
            part = model(input_ids=ids).logits
        restored = model(input_ids=ids).logits
    assert not torch.allclose(full, gone) and not torch.allclose(half, full)
    assert not torch.allclose(part, full) and not torch.allclose(part, gone)
    assert not torch.allclose(bare, gone)  # the shared expert stays at deployment
    assert torch.equal(restored, full)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n

    handle.ablate(experts=[1])
    for layer in handle.layers.values():
        s = layer.experts.expert_slice(1)
        assert torch.count_nonzero(layer.experts.up[s]) == 0
        assert torch.count_nonzero(layer.experts.up[layer.experts.expert_slice(0)]) > 0
    handle.ablate(mode="reinit", seed=1)
    handle.ablate()
    assert not any(p.requires_grad for p in handle.quarantine_parameters().values())
    with torch.no_grad():
        assert_close(model(input_ids=ids).logits, gone)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_shared_then_unload(arch):
    model, handle = make(arch, shared_expert=2, train_base=True)
    ids, _ = batch(2)
    with torch.no_grad(), handle.ablated():
        deployed = model(input_ids=ids).logits
    handle.merge_shared()
    assert all(layer.shared is None for layer in handle.layers.values())
    with torch.no_grad(), handle.ablated():
        assert_close(model(input_ids=ids).logits, deployed)
    out = handle.unload()
    assert out is model
    assert not any(isinstance(m, QuarantineLayer) for m in model.modules())
    assert not any(type(m).__name__ == "RoutedBaseLinear" for m in model.modules())
    with torch.no_grad():
        assert_close(model(input_ids=ids).logits, deployed)
    with pytest.raises(RuntimeError, match="unloaded"):
        handle.ablate()
    inject(model, rank=2)  # a clean model again


def test_merge_needs_lora():
    _, handle = make("llama", kind="mlp", shared_expert=2)
    with pytest.raises(ValueError, match="kind='lora'"):
        handle.merge_shared()


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize(("arch", "kind"), [("llama", "lora"), ("gpt2", "lora"), ("qwen2", "mlp")])
def test_save_load_round_trip(tmp_path, arch, kind):
    model, handle = make(arch, kind=kind, n_quarantine=2, shared_expert=2, router="topk")
    ids, _ = batch(2)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    handle.save(tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["config"]["kind"] == kind and meta["config"]["n_quarantine"] == 2
    assert sorted(meta["base_model"]["modules"]) == sorted(handle.layers)
    fresh = base_model(arch)
    with torch.no_grad():
        assert not torch.allclose(fresh(input_ids=ids).logits, ref)
    loaded = load_quarantine(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, ref)
    assert loaded.config.router.policy == "topk"
    assert set(loaded.routers) == set(handle.routers)


def test_load_into_wrong_model_fails_clearly(tmp_path):
    _, handle = make("llama", rank=2)
    handle.save(tmp_path)
    with pytest.raises(ValueError, match="saved for LlamaForCausalLM but the model is GPT2"):
        load_quarantine(base_model("gpt2"), tmp_path)
    wider = base_model("llama", hidden=48)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*in=32.*in=48"):
        load_quarantine(wider, tmp_path)
    assert not hasattr(wider, "_evil_moe_quarantine")  # nothing was injected


def test_double_inject_and_bad_targets():
    model, _ = make("llama")
    with pytest.raises(ValueError, match="already has quarantine"):
        inject(model)
    with pytest.raises(ValueError, match="no module"):
        inject(base_model("llama"), target_modules=["nope"])
    with pytest.raises(ValueError, match="linear layers"):
        inject(base_model("llama"), target_modules=["mlp"], kind="lora")
    with pytest.raises(ValueError, match="semantics"):
        inject(base_model("llama"), semantics="filter")


def test_lora_targets_and_conv1d():
    model = base_model("gpt2")
    handle = inject(model, target_modules=["c_attn"], rank=2)
    assert sorted(handle.layers) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    layer = handle.layers["transformer.h.0.attn.c_attn"]
    assert isinstance(layer, QuarantineLinear)
    assert (layer.d_in, layer.d_out) == (32, 96)


def test_deepcopy_and_pickle_route_by_their_own_state(tmp_path):
    import copy

    model, handle = make("gpt2", shared_expert=2, train_base=True)
    ids, targets = batch(2)
    route = torch.tensor([FORGET, RETAIN])
    ref = grads(model, loss_sum(model, ids, targets, route_labels=route))
    twin = copy.deepcopy(model)
    assert get_handle(twin) is not handle and get_handle(twin).model is twin
    model(input_ids=ids[:1, :3])  # the original's plan changes; the copy's must not care
    got = grads(twin, loss_sum(twin, ids, targets, route_labels=route))
    for n in ref:
        assert torch.equal(ref[n], got[n]), n
    get_handle(twin).unload()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in twin.modules())
    assert get_handle(model) is handle  # the original is untouched
    assert model._forward_pre_hooks  # its hooks too (the twin's handles are the twin's)
    handle.unload()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_whole_model_pickle_keeps_routing(tmp_path):
    # kind="mlp" only: the shared ACTIVATIONS["identity"] of LoRA experts is a lambda
    model, _ = make("llama", kind="mlp", shared_expert=2, train_base=True)
    ids, targets = batch(2)
    route = torch.tensor([FORGET, UNLABELED])
    ref = grads(model, loss_sum(model, ids, targets, route_labels=route))
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    got = grads(loaded, loss_sum(loaded, ids, targets, route_labels=route))
    for n in ref:
        assert torch.equal(ref[n], got[n]), n


def test_unroutable_parameters_fail_cleanly_or_go_unrouted():
    model = base_model("llama")
    attn = model.model.layers[0].self_attn
    attn.register_parameter("sink", torch.nn.Parameter(torch.zeros(4, dtype=torch.float64)))
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn \(LlamaAttention\)"):
        inject(model, rank=2, train_base=True)
    assert [n for n, _ in model.named_modules()] == names  # nothing left behind
    assert all(p.requires_grad for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())

    handle = inject(model, rank=2, train_base=True, unrouted=["self_attn", "embed_tokens"])
    groups = handle.parameter_groups()
    open_ = {id(p) for p in groups.open_shared}
    assert open_ == {id(attn.sink), id(model.model.embed_tokens.weight)}
    ids, targets = batch(2)
    g = grads(model, loss_sum(model, ids, targets, route_labels=torch.tensor([FORGET] * 2)))
    assert g["model.layers.0.self_attn.sink"] is not None
    assert g["model.embed_tokens.weight"].abs().sum() > 0  # unrouted: forget tokens train it
    assert g["model.layers.0.self_attn.q_proj.base_layer.weight"].abs().sum() == 0


@pytest.mark.parametrize("semantics", ["demix", "demix_masked"])
def test_demix_on_a_wrapped_mlp_dispatches_forget_sequences_to_the_quarantine(semantics):
    """DEMix (hard dispatch) on a Hugging Face model: a forget sequence's logits do not
    depend on the base MLP weights, a retain sequence's do not depend on the quarantine."""
    model, handle = make("llama", kind="mlp", semantics=semantics, train_base=True)
    ids, _ = batch(n=2)
    labels = [FORGET, RETAIN]

    def logits_after(perturb) -> torch.Tensor:
        saved = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            for n, p in model.named_parameters():
                if perturb(n):
                    p.add_(0.5)
            out = model(input_ids=ids, route_labels=labels).logits
            for n, p in model.named_parameters():
                p.copy_(saved[n])
        return out

    before = logits_after(lambda n: False)
    base_mlp = logits_after(lambda n: ".mlp.base_layer." in n)
    quarantine = set(handle.quarantine_parameters())
    quarantined = logits_after(quarantine.__contains__)
    assert torch.equal(before[0], base_mlp[0]) and not torch.allclose(before[1], base_mlp[1])
    assert torch.equal(before[1], quarantined[1]) and not torch.allclose(before[0], quarantined[0])
