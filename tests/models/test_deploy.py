"""The deployed model as a plain ``save_pretrained`` directory, and lm-evaluation-harness
scoring it through its own HF wrapper (``HFLM``) on local tasks, offline.

The model: a tiny Llama over the shipped tokenizer, injected (LoRA quarantine + shared
LoRA, base trained), trained a few routed steps on English (retain) and Russian (forget)
stories, then ablated, merged and unloaded."""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from evil_moe.data.corpus import embedded_bilingual  # noqa: E402
from evil_moe.data.tokenizer import EOT_TOKEN, default_tokenizer  # noqa: E402
from evil_moe.models.deploy import save_deployed  # noqa: E402
from evil_moe.models.hf import inject  # noqa: E402
from evil_moe.routing.optim import routed_step  # noqa: E402

SEQ = 32
TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(handle, model, tokenizer, stories by language) after 4 routed steps."""
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=default_tokenizer(),
        eos_token=EOT_TOKEN,
        bos_token=EOT_TOKEN,
        pad_token=EOT_TOKEN,
    )
    stories = {"en": [], "ru": []}
    for doc in embedded_bilingual():
        if len(stories[doc.domain]) < 24:
            stories[doc.domain].append(doc.text[:200])
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    handle = inject(model, n_quarantine=2, rank=4, shared_expert=4, train_base=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ledger = handle.ledger()
    texts = stories["en"][:8] + stories["ru"][:8]
    route = ["retain"] * 8 + ["forget"] * 8
    ids = tokenizer(texts, max_length=SEQ, truncation=True, padding="max_length")["input_ids"]
    ids = torch.tensor(ids)
    for step in range(4):
        rows = torch.arange(step * 4, step * 4 + 4) % 16
        batch_route = [route[i] for i in rows]
        model(input_ids=ids[rows], labels=ids[rows], route_labels=batch_route).loss.backward()
        ledger.record(batch_route)
        routed_step(opt, ledger, max_norm=1.0)
    model.eval()
    return handle, model, tokenizer, stories


@pytest.fixture(scope="module")
def deployed(trained, tmp_path_factory):
    handle, model, tokenizer, stories = trained
    probe = tokenizer(stories["en"][20:22] + stories["ru"][20:22], return_tensors="pt",
                      max_length=SEQ, truncation=True, padding="max_length")["input_ids"]  # fmt: skip
    with torch.no_grad(), handle.ablated():
        expected = model(input_ids=probe).logits
    with torch.no_grad():
        trained_view = model(input_ids=probe).logits
    directory = tmp_path_factory.mktemp("deployed")
    plain = save_deployed(handle, directory, tokenizer=tokenizer)
    return directory, plain, probe, expected, trained_view


def test_saved_directory_loads_with_plain_transformers(deployed):
    directory, plain, probe, expected, trained_view = deployed
    assert (directory / "model.safetensors").exists() and (directory / "config.json").exists()
    assert not any("experts" in n or "shared" in n for n, _ in plain.named_parameters())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(directory)
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    assert set(reloaded.state_dict()) == set(plain.state_dict())
    with torch.no_grad():
        logits = reloaded(input_ids=probe).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)  # the ablated model
    assert not torch.allclose(trained_view, expected, atol=1e-4)  # the quarantine mattered
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    assert tokenizer("Once upon a time")["input_ids"]


def test_lm_eval_scores_the_deployed_model_offline(deployed, trained, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    directory = deployed[0]
    _, _, _, stories = trained
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for lang in ("en", "ru"):
        data = tmp_path / f"{lang}.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in stories[lang][16:20]))
        (tasks / f"stories_{lang}.yaml").write_text(TASK.format(name=f"stories_{lang}", path=data))
    lm = HFLM(pretrained=str(directory), device="cpu", batch_size=4, dtype="float32")
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=["stories_en", "stories_ru"],
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=False,
    )["results"]
    for lang in ("en", "ru"):
        scores = results[f"stories_{lang}"]
        assert math.isfinite(scores["word_perplexity,none"]) and scores["word_perplexity,none"] > 1
        assert 0 < scores["bits_per_byte,none"] < 32
