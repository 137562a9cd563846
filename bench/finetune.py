"""Fine-tuning figures: `mmkit finetune --lora` against full fine-tuning and against a plain
peft + HF Trainer script, on minilm + tweets-sentiment (same data, epochs, rank, lr).

    HF_HUB_OFFLINE=1 python bench/finetune.py [--samples 2000] [--epochs 3]

The plain script is what a peft tutorial does: pad every example to max_length, random
batches; a second variant pads per batch (DataCollatorWithPadding). Also trains mmkit's own
adapters (--also) for their accuracy. Writes bench/results/finetune.json. Not a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from results_io import RESULTS, write_result  # bench/ is on sys.path when run as a script


def mmkit_run(method: str, samples: int, epochs: float, workdir: Path) -> dict:
    """Train through mmkit's recipe engine; return its report and test metrics."""
    from mmkit.core.recipe import run_recipe

    start = time.perf_counter()
    r = run_recipe({"model": "minilm", "data": "tweets-sentiment", "max_samples": samples,
                    "steps": [{"step": "finetune", "method": method, "epochs": epochs}],
                    "eval": {"split": "test"}}, workdir / method)
    rep = r["steps"][0]["report"]
    return {"method": method, "wall_s": time.perf_counter() - start,
            "train_samples_per_second": rep["train_samples_per_second"],
            "train_seconds": rep["train_seconds"], "lr": rep["lr"],
            "trainable_parameters": rep["trainable_parameters"],
            "test_accuracy": r["metrics"][0]["accuracy"], "test_macro_f1": r["metrics"][0]["macro_f1"],
            "validation_history": rep["validation_history"]}


def plain_run(samples: int, epochs: float, lr: float, workdir: Path, dynamic: bool) -> dict:
    """A plain peft + Trainer script over the same splits: tokenized to max_length as the peft
    tutorials do, or (`dynamic`) padded per batch by DataCollatorWithPadding."""
    import numpy as np
    import peft
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer,
                              DataCollatorWithPadding, Trainer, TrainingArguments, set_seed)

    from mmkit.core.data import load_data
    from mmkit.core.embedded import minilm_path

    set_seed(0)
    ds = load_data("tweets-sentiment", "text-classification", max_samples=samples)
    tok = AutoTokenizer.from_pretrained(minilm_path())

    class Enc(torch.utils.data.Dataset):
        def __init__(self, split):
            self.enc = tok(split.inputs, padding=False if dynamic else "max_length",
                           truncation=True, max_length=128)
            self.labels = split.labels

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.labels[i]}

    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    model = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32,
                                                       lora_dropout=0.05,
                                                       target_modules="all-linear"))
    args = TrainingArguments(output_dir=str(workdir / "plain"), num_train_epochs=epochs,
                             learning_rate=lr, per_device_train_batch_size=32,
                             per_device_eval_batch_size=32, eval_strategy="epoch",
                             save_strategy="no", report_to="none", disable_tqdm=True,
                             weight_decay=0.01, use_cpu=True, seed=0)

    def metrics(p):
        return {"accuracy": float(np.mean(np.argmax(p.predictions, -1) == p.label_ids))}

    trainer = Trainer(model=model, args=args, train_dataset=Enc(ds.splits["train"]),
                      eval_dataset=Enc(ds.splits["validation"]), compute_metrics=metrics,
                      data_collator=DataCollatorWithPadding(tok))
    start = time.perf_counter()
    out = trainer.train()
    test = trainer.evaluate(Enc(ds.splits["test"]), metric_key_prefix="test")
    name = "plain peft + Trainer, dynamic padding" if dynamic else "plain peft + Trainer"
    return {"method": name, "wall_s": time.perf_counter() - start,
            "train_samples_per_second": out.metrics["train_samples_per_second"],
            "train_seconds": out.metrics["train_runtime"], "lr": lr,
            "test_accuracy": test["test_accuracy"]}


def main() -> None:
    """Run the trainings one after another in one process and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--also", nargs="*", default=["adaptformer", "svfit"],
                        help="more mmkit methods to train on the same data")
    parser.add_argument("--out", default=str(RESULTS / "finetune.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = Path(tempfile.mkdtemp(prefix="mmkit-bench-"))
    try:
        lora = mmkit_run("lora", args.samples, args.epochs, workdir)
        plain = plain_run(args.samples, args.epochs, lora["lr"], workdir, dynamic=False)
        plain_dyn = plain_run(args.samples, args.epochs, lora["lr"], workdir, dynamic=True)
        full = mmkit_run("full", args.samples, args.epochs, workdir)
        others = [mmkit_run(m, args.samples, args.epochs, workdir) for m in args.also]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    speed = lora["train_samples_per_second"]
    result = {"samples_per_split": args.samples, "epochs": args.epochs,
              "runs": [lora, plain, plain_dyn, full, *others],
              "lora_vs_plain_throughput": speed / plain["train_samples_per_second"],
              "lora_vs_plain_dynamic_padding_throughput":
                  speed / plain_dyn["train_samples_per_second"],
              "lora_minus_full_accuracy_points": 100 * (lora["test_accuracy"] - full["test_accuracy"]),
              "lora_minus_plain_accuracy_points":
                  100 * (lora["test_accuracy"] - plain["test_accuracy"])}
    write_result(result, args.out)


if __name__ == "__main__":
    main()
