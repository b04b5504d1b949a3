"""Run by the Trainer DDP test under ``accelerate launch`` (2 CPU processes, 1 row per
rank and step) and as one plain process (2 rows per step): three steps of
:class:`RoutedTrainer` on a tiny injected Llama, rows in order, then each process saves its
step reports and parameters to ``OUT/rank{r}.pt``.

    step 1: rows 0-1 = forget | retain: rank 0 forget only, rank 1 retain only
    step 2: rows 2-3 = forget | forget: a forget-only global step
    step 3: rows 4-5 = unlabeled | forget
"""

from __future__ import annotations

import sys
from pathlib import Path

import datasets
import torch
import transformers

from evil_moe.models.hf import RoutedTrainer, inject

F, R, U = "forget", "retain", "unlabeled"
ROUTES = [F, R, F, F, U, F]


class Record(transformers.TrainerCallback):
    """Each step's routed-step report and parameters."""

    def __init__(self):
        self.steps = []
        self.trainer = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        report = next(
            c.report for c in self.trainer.callback_handler.callbacks if hasattr(c, "ledger")
        )
        params = {n: p.detach().clone() for n, p in self.trainer.model.named_parameters()}
        self.steps.append({"idle": report.idle, "norms": report.grad_norm, "params": params})


def main(out: Path, per_device: int, report_to: list[str]) -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    inject(model, n_quarantine=2, rank=2, shared_expert=2, train_base=True)
    ids = torch.randint(0, 128, (len(ROUTES), 8), generator=torch.Generator().manual_seed(1))
    data = datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "labels": ids.tolist(), "route_labels": ROUTES}
    )
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=3,
        per_device_train_batch_size=per_device,
        learning_rate=1e-2,
        weight_decay=0.1,
        max_grad_norm=1.0,
        train_sampling_strategy="sequential",
        use_cpu=True,
        report_to=report_to,
        logging_steps=1,
        save_strategy="no",
        seed=0,
    )
    record = Record()
    trainer = RoutedTrainer(model=model, args=args, train_dataset=data, callbacks=[record])
    record.trainer = trainer
    trainer.train()
    torch.save(
        {"steps": record.steps, "world": args.world_size},
        out / f"rank{args.process_index}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
