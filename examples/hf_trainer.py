"""structkit inside a Hugging Face ``transformers.Trainer``: group a BERT classifier's attention heads and FFN
neurons, train with RAMDA handed to the Trainer, step the stage schedule from a callback, remove the
exactly-zero heads and neurons, check that the slim model computes the same function, save and reload it.

    python examples/hf_trainer.py          # ~15 s on 2 CPU cores; a tiny random BERT and synthetic data, offline

Needs ``pip install -e ".[transformers]"`` (transformers and accelerate). The only structkit-specific lines are
marked ``# structkit``. Three things matter when handing a structkit solver to the Trainer:

* ``optimizers=(opt, scheduler)`` with a scheduler that leaves the learning rate alone (``ConstantLR`` with
  factor 1). With ``None`` the Trainer makes its own linear decay, and any ``LambdaLR``-style scheduler would
  reset the learning rate every step, undoing the stage restarts (lr x gamma);
* a ``TrainerCallback`` that calls ``StageScheduler.step()`` at the end of every epoch. The scheduler is told the
  number of epochs and steps per epoch, so the final stage ramps the averaging momentum to 1 by its middle and
  the model ends with whole heads / neurons exactly zero;
* ``max_grad_norm=0`` (no gradient clipping): clipping rescales the gradients that the group-lasso threshold
  ``lam`` is weighed against, so with it the same ``lam`` removes far more (here: every head).

The model is initialised with ``initializer_range=0.2`` instead of BERT's 0.02: from weights that small, group
lasso zeroes every group before training has found which ones matter (a pretrained model, as in
``structkit run configs/minilm.yaml``, does not have that problem).
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch
from torch.utils.data import Dataset

import structkit
from structkit.solvers import RAMDA, StageScheduler

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
VOCAB, LENGTH = 64, 16


class Synthetic(Dataset):
    """Token sequences [CLS] w1 .. w14 [SEP] of a two-topic language: each sequence draws 80 % of its words from
    its label's half of the vocabulary and 20 % from the other half (attention that pools the words solves it)."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        half = (VOCAB - 4) // 2
        own = torch.rand(n, LENGTH - 2, generator=g) < 0.8
        topic = torch.where(own, self.labels[:, None], 1 - self.labels[:, None])
        words = 4 + topic * half + torch.randint(0, half, (n, LENGTH - 2), generator=g)
        self.ids = torch.cat([torch.full((n, 1), 1), words, torch.full((n, 1), 2)], 1)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long),
                "labels": self.labels[i]}


def make_model():
    """A small BERT classifier with random weights (a BertConfig builds it: nothing is downloaded)."""
    from transformers import BertConfig, BertForSequenceClassification
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                        intermediate_size=128, max_position_embeddings=LENGTH, num_labels=2,
                        initializer_range=0.2)
    return BertForSequenceClassification(config)


def main(epochs: int = 6, lam: float = 3e-3, batch_size: int = 32, seed: int = 0, out: str | None = None) -> dict:
    from torch.optim.lr_scheduler import ConstantLR
    from transformers import Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(seed)
    train, test = Synthetic(1024, seed), Synthetic(256, seed + 1)
    model = make_model()
    example = {"input_ids": test.ids[:8], "attention_mask": torch.ones(8, LENGTH, dtype=torch.long)}

    # structkit: one group per attention head (q, k, v rows + output columns) and one per FFN neuron
    groups = structkit.group_parameters(model, example, [
        {"kind": "heads", "lam": lam},
        {"kind": "channels", "select": "*intermediate.dense", "types": ["Linear"], "lam": lam}])
    opt = RAMDA(groups.param_groups(), lr=3e-3, momentum=0.1)  # structkit
    steps_per_epoch = math.ceil(len(train) / batch_size)
    # structkit: the last stage (final 2 epochs) restarts and ramps the momentum to 1 -> exactly-zero groups
    stages = StageScheduler(opt, milestones=[epochs - 2], epochs=epochs, steps_per_epoch=steps_per_epoch)

    class StageCallback(TrainerCallback):  # structkit: one StageScheduler step per epoch
        def on_epoch_end(self, args, state, control, **kwargs):
            stages.step()

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, num_train_epochs=epochs, per_device_train_batch_size=batch_size,
                                 use_cpu=True, report_to="none", save_strategy="no", logging_strategy="epoch",
                                 disable_tqdm=True, seed=seed, max_grad_norm=0.0)  # structkit: no clipping
        trainer = Trainer(model=model, args=args, train_dataset=train,
                          optimizers=(opt, ConstantLR(opt, factor=1.0, total_iters=0)),  # structkit: lr left alone
                          callbacks=[StageCallback()])
        trainer.train()

    model.eval()
    metrics = groups.metrics()  # structkit: which groups are exactly zero
    slim, report = structkit.prune(model, groups, example)  # structkit: remove them, verified
    with torch.no_grad():
        logits = slim(input_ids=test.ids, attention_mask=torch.ones_like(test.ids)).logits
    accuracy = (logits.argmax(1) == test.labels).float().mean().item()
    heads = [layer.attention.self.num_attention_heads for layer in slim.bert.encoder.layer]
    ffn = [layer.intermediate.dense.out_features for layer in slim.bert.encoder.layer]

    path = Path(out or tempfile.mkdtemp()) / "slim.pt"
    structkit.save_slim(slim, path)  # structkit: widths and head counts as data, weights as tensors
    reloaded = structkit.load_slim(path)  # rebuilt from the recorded BertConfig; never unpickles code
    reload_diff = structkit.verify(slim, reloaded, example)

    print(f"exactly-zero groups: {metrics['zero_groups']} of {metrics['num_groups']}; heads per layer {heads} "
          f"(of 8), FFN neurons {ffn} (of 128); test accuracy {accuracy:.3f}")
    print(report.summary())
    print(f"saved {path}; reloaded model differs by {reload_diff:.3g}")
    return {"accuracy": accuracy, "zero_groups": metrics["zero_groups"], "heads": heads, "ffn": ffn,
            "params_before": report.params_before, "params_after": report.params_after,
            "verify_rel_diff": report.verify_rel_diff, "reload_diff": reload_diff}


if __name__ == "__main__":
    torch.set_num_threads(1)  # a tiny model: one thread is fastest
    main()
