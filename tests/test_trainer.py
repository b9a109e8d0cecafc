"""sparsefx.integrations.transformers.DSTCallback in the Hugging Face Trainer: DST is built
from the Trainer's optimizer and max_steps, steps once per optimizer step (gradient
accumulation included), saves its state with every checkpoint, and a run resumed from a
checkpoint ends exactly where the uninterrupted run ends."""
import copy
import inspect
import json

import pytest
import torch

import sparsefx

transformers = pytest.importorskip("transformers")
from sparsefx.integrations.transformers import STATE_FILE, DSTCallback  # noqa: E402

STEPS, SEQUENCE = 12, 32


class Bytes(torch.utils.data.Dataset):
    """Windows of the standard library's json package source, as byte ids."""

    def __init__(self):
        text = inspect.getsource(json) + inspect.getsource(json.decoder)
        self.data = torch.tensor(list(text.encode()), dtype=torch.long)

    def __len__(self):
        return 64

    def __getitem__(self, i):
        window = self.data[i * SEQUENCE:(i + 1) * SEQUENCE]
        return {"input_ids": window, "labels": window}


def _model():
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=256,
                                     n_positions=SEQUENCE)
    torch.manual_seed(0)
    return sparsefx.transform(transformers.GPT2LMHeadModel(config), "fanin", 0.9,
                              init="random", seed=0)


def _trainer(model, folder, callback):
    args = transformers.TrainingArguments(
        output_dir=str(folder), max_steps=STEPS, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=3e-3, save_strategy="steps",
        save_steps=6, logging_steps=1, report_to=[], seed=0, use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0)
    return transformers.Trainer(model=model, args=args, train_dataset=Bytes(),
                                callbacks=[callback])


def test_dst_callback_trains_checkpoints_and_resumes_on_the_same_trajectory(tmp_path):
    model = _model()
    start = {name: b.clone() for name, b in model.named_buffers() if name.endswith("indices")}
    callback = DSTCallback(method="srigl", delta_t=3)
    _trainer(model, tmp_path, callback).train()
    assert callback.dst.step_count == STEPS  # optimizer steps, not the 24 micro-batches
    moved = [n for n, b in model.named_buffers() if n in start and not torch.equal(b, start[n])]
    assert moved, "the structure never moved"
    assert (tmp_path / "checkpoint-6" / STATE_FILE).exists()
    straight = copy.deepcopy(model.state_dict())

    resumed_model = _model()
    resumed = DSTCallback(method="srigl", delta_t=3)
    _trainer(resumed_model, tmp_path, resumed).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    assert resumed.dst.step_count == STEPS
    for name, value in resumed_model.state_dict().items():
        assert torch.equal(value, straight[name]), name


def test_a_resume_without_the_dst_state_says_where_to_find_it(tmp_path):
    model = _model()
    _trainer(model, tmp_path, DSTCallback(method="rigl", delta_t=3)).train()
    (tmp_path / "checkpoint-6" / STATE_FILE).unlink()
    with pytest.raises(ValueError, match=r"resumes at step 6, but .*sparsefx_dst.pt does not "
                                         r"exist: pass DSTCallback\(resume_from="):
        _trainer(_model(), tmp_path, DSTCallback(method="rigl", delta_t=3)).train(
            resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
