"""What one op call costs when the kernel has almost nothing to do: a 128x128 layer at batch 1,
where ``F.linear`` itself takes a few microseconds. This is the per-call price every sparse
layer of a real model pays on top of its kernel.

Candidates, all on the same 128x128 weights (90 % sparse for the sparsefx ops), with a bias:

* the functions: ``F.linear`` against ``torch.ops.sparsefx.diag_linear`` and
  ``torch.ops.sparsefx.fanin_linear``, with no gradient wanted (inference) and with the
  weights requiring grad (the call records its backward node; no backward is run);
* the modules: ``nn.Linear`` against the ``DiagLinear`` / ``FanInLinear`` that
  ``sparsefx.transform`` puts in a model (their Python ``forward`` included).

Target: each sparsefx call at most 2x the time of its dense counterpart.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import sparsefx
from common import Candidate, fmt, interleaved, machine_line, markdown_table, median_ratio, \
    median_time

TARGET = 2.0  # at most this many times the dense call


def _model(width: int, pattern: str, sparsity: float) -> nn.Module:
    dense = nn.Sequential(nn.Linear(width, width))
    return dense if pattern == "dense" else sparsefx.transform(dense, pattern=pattern,
                                                               sparsity=sparsity)


def run(args, progress) -> list[dict]:
    width, sparsity = args.call_width, 0.9
    torch.manual_seed(0)
    layers = {p: _model(width, p, sparsity)[0] for p in ("dense", "diag", "fanin")}
    x = torch.randn(1, width)
    rows = []
    for grad in (False, True):
        for layer in layers.values():
            layer.requires_grad_(grad)
        dense, diag, fanin = layers["dense"], layers["diag"], layers["fanin"]
        context = torch.enable_grad if grad else torch.no_grad
        forms = {
            "function": {
                "dense": lambda: F.linear(x, dense.weight, dense.bias),
                "diag": lambda: torch.ops.sparsefx.diag_linear(x, diag.values, diag.offsets,
                                                               width, diag.bias),
                "fanin": lambda: torch.ops.sparsefx.fanin_linear(x, fanin.values,
                                                                 fanin.indices, fanin.bias),
            },
            "module": {"dense": lambda: dense(x), "diag": lambda: diag(x),
                       "fanin": lambda: fanin(x)},
        }
        for form, calls in forms.items():
            def timed(call):
                def step():
                    with context():
                        call()
                return step
            candidates = {name: Candidate(f"{form} {name}", timed(call), warmup=20)
                          for name, call in calls.items()}
            interleaved(list(candidates.values()), args.rounds, args.min_run_time)
            for name, candidate in candidates.items():
                ratio = median_ratio(candidate, candidates["dense"])  # sparse / dense time
                row = dict(form=form, grad=grad, candidate=name, width=width,
                           us=1e6 * median_time(candidate),
                           rounds_us=[1e6 * t for t in candidate.times],
                           time_vs_dense=ratio,
                           met=None if name == "dense" else bool(ratio <= TARGET))
                rows.append(row)
                progress(f"call {form:8s} {'grad' if grad else 'no grad':7s} {name:6s} "
                         f"{row['us']:7.2f} us  {ratio:5.2f}x dense's time")
    return rows


def markdown(payload: dict, info: dict) -> str:
    rows = payload["rows"]
    width = rows[0]["width"] if rows else 0
    lines = [f"# One op call at {width}x{width}, batch 1 (CPU)", "",
             f"Command: `{payload['command']}`  ",
             f"Machine: {machine_line(info)}.  ",
             f"Method: {payload['method']}", "",
             "Time of one call, forward only, 90 % sparse, with a bias; `grad`: the weights "
             "require grad, so the call also records its backward node. Time vs dense = the "
             "candidate's time / the dense call's (median of per-round ratios). Target: at "
             f"most {TARGET:g}x.", ""]
    table = [[r["form"], "grad" if r["grad"] else "no grad", r["candidate"], fmt(r["us"], ".2f"),
              fmt(r["time_vs_dense"], ".2f") + "x",
              "—" if r["met"] is None else ("**met**" if r["met"] else "**missed**")]
             for r in rows]
    lines += markdown_table(["form", "autograd", "candidate", "us per call", "time vs dense",
                             f"target (<= {TARGET:g}x)"], table, "lllrrl")
    return "\n".join(lines) + "\n"
