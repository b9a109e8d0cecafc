"""``DSTCallback``: dynamic sparse training inside the Hugging Face ``Trainer``.

    model = sparsefx.transform(model, "diag", 0.9, init="random")
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[DSTCallback(method="dynadiag")])
    trainer.train()                                    # or resume_from_checkpoint=...

At ``on_train_begin`` the callback builds ``sparsefx.DST`` from the Trainer's own optimizer
(unwrapped from accelerate's wrapper) with ``total_steps`` = the Trainer's ``max_steps``;
it calls ``dst.step()`` in ``on_optimizer_step``, once per optimizer step, so a step of
gradient accumulation counts once (its growth scores come from its last micro-batch); it
writes ``dst.state_dict()`` into every checkpoint folder the Trainer saves
(``sparsefx_dst.pt``), and on a resumed run loads it back from the checkpoint the Trainer
resumed from, so ``resume_from_checkpoint`` continues the same trajectory (the structure
itself is in the model's weights, which the Trainer restores).
"""
from __future__ import annotations

import os

import torch
from transformers import TrainerCallback

from sparsefx.dst import DST

__all__ = ["DSTCallback", "STATE_FILE"]

STATE_FILE = "sparsefx_dst.pt"


class DSTCallback(TrainerCallback):
    """Runs ``sparsefx.DST(model, optimizer, method=method, total_steps=max_steps,
    **dst_options)`` inside a ``Trainer`` (see the module docstring). ``resume_from``: the
    checkpoint folder to take the DST state from on a resumed run, when it is not the
    Trainer's ``output_dir/checkpoint-<step>``."""

    def __init__(self, method="rigl", resume_from: str | os.PathLike | None = None,
                 **dst_options):
        self.method, self.dst_options, self.resume_from = method, dst_options, resume_from
        self.dst: DST | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise ValueError("sparsefx DSTCallback: the Trainer passed no model or optimizer "
                             "to on_train_begin")
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        self.dst = DST(model, optimizer, self.method, total_steps=state.max_steps,
                       **self.dst_options)
        if state.global_step > 0:  # resumed from a checkpoint
            folder = self.resume_from or os.path.join(args.output_dir,
                                                      f"checkpoint-{state.global_step}")
            path = os.path.join(folder, STATE_FILE)
            if not os.path.exists(path):
                raise ValueError(f"sparsefx DSTCallback: the run resumes at step "
                                 f"{state.global_step}, but {path} does not exist: pass "
                                 "DSTCallback(resume_from=<the checkpoint folder>)")
            self.dst.load_state_dict(torch.load(path, weights_only=True))

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.dst.step()

    def on_save(self, args, state, control, **kwargs):
        if self.dst is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        temporary = os.path.join(folder, f".{STATE_FILE}.tmp")
        torch.save(self.dst.state_dict(), temporary)
        os.replace(temporary, os.path.join(folder, STATE_FILE))
