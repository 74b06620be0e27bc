"""siftc's mask scheduler inside the HuggingFace Trainer and PyTorch Lightning (issue 15): a few real
training steps of a converted model on CPU, masks change exactly at the update step and keep their
non-zero counts, one mask step per optimizer step under gradient accumulation, RigL gets its dense
gradient, updates are logged, and a run resumed from a checkpoint continues the scheduler (the final
masks and weights equal an uninterrupted run's). A missing trainer package is a one-line ImportError."""
import copy
import csv
import subprocess
import sys

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import siftc
from siftc.errors import UsageError
from siftc.sparse import sparse_layers

from conftest import ROOT, spec_path

MLP = spec_path("examples/mlp.py:mlp")
STEPS = 8


@pytest.fixture(scope="module")
def converted():
    """The 75% Sparse Wide MLP, untrained; each test trains a copy."""
    return siftc.convert(MLP, "wide", 0.75, seed=0)


def data(n=32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)


def masks(model) -> dict:
    return {name: layer.mask.clone() for name, layer in sparse_layers(model).items()}


def check_masks_by_step(seen: dict, initial: dict, updates: list[int]):
    """Masks change at exactly the update steps and keep every layer's non-zero count."""
    before = initial
    for step in range(1, STEPS + 1):
        now = seen[step]
        changed = any(not torch.equal(now[n], before[n]) for n in now)
        assert changed == (step in updates), (step, updates)
        assert all(int(now[n].sum()) == int(initial[n].sum()) for n in now), step
        before = now


def pinned(model):
    """A copy on one backend (torch), for an exactness check of two runs: under auto each copy times its
    own layers after every mask update, and two choices differ by float rounding."""
    return siftc.set_backend(copy.deepcopy(model), "torch")


def weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6, rtol=1e-5), k
        if k.endswith("positions"):
            assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------ HuggingFace Trainer



class Examples(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def cross_entropy(outputs, labels, num_items_in_batch=None):
    """The loss of logits; summed over the accumulation window's items, as the Trainer asks."""
    if num_items_in_batch is None:
        return F.cross_entropy(outputs, labels)
    return F.cross_entropy(outputs, labels, reduction="sum") / num_items_in_batch


class MaskRecorder(transformers.TrainerCallback):
    """Each optimizer step's masks, after the step (and the SparsityCallback) ran."""

    def __init__(self):
        self.initial, self.seen = None, {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.initial = masks(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.seen[state.global_step] = masks(model)


def hf_trainer(out, model, callbacks, batch=8, accumulation=1, save_steps=None, n=32):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, learning_rate=1e-2, lr_scheduler_type="constant",
        use_cpu=True, report_to=[], disable_tqdm=True, logging_steps=1, remove_unused_columns=False,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or STEPS, seed=0)
    return transformers.Trainer(model=model, args=args, train_dataset=Examples(*data(n)),
                                compute_loss_func=cross_entropy, callbacks=callbacks)


def test_hf_rigl_with_gradient_accumulation_updates_at_the_optimizer_step(tmp_path, converted):
    from siftc.integrations.transformers import SparsityCallback

    model = copy.deepcopy(converted)
    forwards = []
    model.register_forward_pre_hook(lambda m, args: forwards.append(1) if m.training else None)
    sparsity, recorder = SparsityCallback("rigl", update_every=4), MaskRecorder()
    trainer = hf_trainer(tmp_path, model, [sparsity, recorder], batch=8, accumulation=2)
    trainer.train()
    assert len(forwards) == 2 * STEPS  # two micro-batches per optimizer step ...
    sched = sparsity.scheduler
    assert sched.t == trainer.state.global_step == STEPS  # ... one mask step per optimizer step
    check_masks_by_step(recorder.seen, recorder.initial, updates=[4])  # end 75%: no update at 8
    assert sched.updates == 1 and sched.dense_grad_steps == 1  # RigL had its dense gradient
    logged = [r for r in trainer.state.log_history if "mask/changed" in r]
    assert [r["step"] for r in logged] == [4] and logged[0]["mask/changed"] > 0
    assert logged[0]["mask/drop_fraction"] == pytest.approx(sched.drop_fraction_at(4))


def test_hf_resume_from_a_checkpoint_continues_the_scheduler(tmp_path, converted):
    from siftc.integrations.transformers import SparsityCallback

    full = pinned(converted)
    callback = SparsityCallback("set", update_every=2, seed=5)
    hf_trainer(tmp_path / "full", full, [callback], save_steps=3).train()
    assert callback.scheduler.updates == 2  # at steps 2 and 4 (75% of 8: none at 6)

    resumed = pinned(converted)
    again, recorder = SparsityCallback("set", update_every=2, seed=5), MaskRecorder()
    trainer = hf_trainer(tmp_path / "resumed", resumed, [again, recorder])
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert again.scheduler.t == STEPS and again.scheduler.updates == 2
    assert min(recorder.seen) == 4  # it started after step 3
    assert_same_weights(weights(resumed), weights(full))  # SET's draw at step 4 came from the saved generator
    logged = [r["step"] for r in trainer.state.log_history if "mask/changed" in r]
    assert logged == [2, 4]  # the checkpoint's record and the resumed run's


class Sentences(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"input_ids": torch.randint(0, 128, (16,), generator=g),
                "attention_mask": torch.ones(16, dtype=torch.long), "labels": i % 3}


def test_hf_trains_a_converted_hf_model_built_from_a_config(tmp_path):
    """A tiny BERT (random init from its config, nothing downloaded) converted Sparse Wide, returning
    its ModelOutput, in the Trainer with RigL and gradient accumulation."""
    from siftc.integrations.transformers import SparsityCallback

    cfg = transformers.BertConfig(vocab_size=128, max_position_embeddings=32, num_hidden_layers=1, hidden_size=32,
                                  num_attention_heads=2, intermediate_size=64, num_labels=3)
    example = Sentences()[0]
    batch = 2  # the example's batch: the converted graph serves the batch it was traced with
    gm = siftc.convert(transformers.BertForSequenceClassification(cfg), "wide", 0.75,
                       {k: example[k].expand(batch, -1) for k in ("input_ids", "attention_mask")})
    sparsity, recorder = SparsityCallback("rigl", update_every=4), MaskRecorder()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=batch, gradient_accumulation_steps=2,
        use_cpu=True, report_to=[], disable_tqdm=True, remove_unused_columns=False, save_strategy="no")
    trainer = transformers.Trainer(model=gm, args=args, train_dataset=Sentences(), callbacks=[sparsity, recorder],
                                   compute_loss_func=lambda out, labels, **kw: F.cross_entropy(out.logits, labels))
    trainer.train()
    assert sparsity.scheduler.t == STEPS and sparsity.scheduler.dense_grad_steps == 1
    check_masks_by_step(recorder.seen, recorder.initial, updates=[4])
    assert [r["step"] for r in trainer.state.log_history if "mask/changed" in r] == [4]


def test_hf_refuses_a_dense_model_and_bad_settings(tmp_path):
    from siftc.integrations.transformers import SparsityCallback

    with pytest.raises(UsageError, match="no siftc sparse layers"):
        hf_trainer(tmp_path, nn.Linear(64, 10), [SparsityCallback("static")]).train()
    with pytest.raises(UsageError, match="unknown method 'magic'"):
        SparsityCallback("magic")
    with pytest.raises(UsageError, match="update_every=0"):
        SparsityCallback("set", update_every=0)


# ------------------------------------------------------------------------------ PyTorch Lightning



class Classifier(L.LightningModule):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class LightningMasks(L.Callback):
    def __init__(self):
        self.initial, self.seen = None, {}

    def on_train_start(self, trainer, pl_module):
        self.initial = masks(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen[trainer.global_step] = masks(pl_module)


def fit(out, module, callbacks, batch=8, accumulation=1, ckpt_every=None, ckpt_path=None):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    if ckpt_every:
        callbacks = [*callbacks, ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=ckpt_every, save_top_k=-1)]
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, accumulate_grad_batches=accumulation,
                        logger=CSVLogger(out, name="logs"), log_every_n_steps=1, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=bool(ckpt_every), callbacks=callbacks,
                        default_root_dir=out)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data()), batch_size=batch)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def test_lightning_rigl_with_gradient_accumulation_updates_at_the_optimizer_step(tmp_path, converted):
    from siftc.integrations.lightning import SparsityCallback

    module = Classifier(copy.deepcopy(converted))
    sparsity, recorder = SparsityCallback("rigl", update_every=4), LightningMasks()
    trainer = fit(tmp_path, module, [sparsity, recorder], batch=8, accumulation=2)
    sched = sparsity.scheduler
    assert sched.t == trainer.global_step == STEPS  # 16 batches, 8 optimizer steps
    check_masks_by_step(recorder.seen, recorder.initial, updates=[4])
    assert sched.updates == 1 and sched.dense_grad_steps == 1
    with open(trainer.logger.log_dir + "/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("mask/changed")]
    assert len(rows) == 1 and float(rows[0]["mask/changed"]) > 0 and float(rows[0]["mask/updates"]) == 1
    assert trainer.callback_metrics["mask/updates"] == 1


def test_lightning_resume_from_a_checkpoint_continues_the_scheduler(tmp_path, converted):
    from siftc.integrations.lightning import SparsityCallback

    full = Classifier(pinned(converted))
    callback = SparsityCallback("set", update_every=2, seed=5)
    fit(tmp_path / "full", full, [callback], batch=32, ckpt_every=3)  # one batch a step: any resume sees it
    assert callback.scheduler.updates == 2
    ckpt = next((tmp_path / "full" / "ckpt").glob("*step=3.ckpt"))
    saved = torch.load(ckpt, weights_only=True)["callbacks"]
    assert [s["t"] for k, s in saved.items() if "SparsityCallback" in k] == [3]

    resumed = Classifier(pinned(converted))
    again, recorder = SparsityCallback("set", update_every=2, seed=5), LightningMasks()
    fit(tmp_path / "resumed", resumed, [again, recorder], batch=32, ckpt_path=str(ckpt))
    assert again.scheduler.t == STEPS and again.scheduler.updates == 2 and min(recorder.seen) == 4
    assert_same_weights(weights(resumed), weights(full))


def test_a_missing_trainer_is_a_one_line_import_error():
    script = """
import sys
sys.modules[sys.argv[1]] = None   # as if it were not installed
try:
    __import__(sys.argv[2])
except ImportError as e:
    print(e)
"""
    for blocked, module, extra in (("transformers", "siftc.integrations.transformers", "transformers"),
                                   ("lightning", "siftc.integrations.lightning", "lightning")):
        run = subprocess.run([sys.executable, "-c", script, blocked, module], capture_output=True, text=True,
                             cwd=ROOT, timeout=120)
        lines = run.stdout.splitlines()
        assert run.returncode == 0 and len(lines) == 1, run.stdout + run.stderr
        assert lines[0].endswith(f"pip install 'siftc[{extra}]'") and blocked in lines[0], lines[0]
