"""What every pattern's Triton launcher shares: tile and warp choices, the autotuner's key
and timing, split reductions for few rows, accumulator dtypes, and ``Variant``, the
description of one launchable specialisation that each launcher lists (``launch_variants()``)
for the ahead-of-time audit (``triton_variants``). Also whether the interpreter can run
the kernels here (``interpreter_problem``)."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

__all__ = ["Variant", "signature", "pick_tile", "split_count", "Split", "accumulator_dtype",
           "rows_bucket", "launch", "warp_choices", "autotune_bench", "SINGLE_ROW",
           "NUM_STAGES", "INTERPRETED", "interpreter_problem"]

NUM_STAGES = 3
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # read once, as Triton reads it

_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                 torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32",
                 torch.int16: "i16"}


@dataclass
class Variant:
    """One launchable specialisation of a ``@triton.jit`` kernel."""

    kernel: object                  # the JITFunction
    signature: dict[str, str]       # argument name -> Triton type ("*bf16", "i32", "constexpr")
    constexprs: dict[str, object]
    num_warps: int = 4
    num_stages: int = NUM_STAGES
    ones: tuple[str, ...] = ()      # integer arguments the launcher passes as 1 (the JIT makes
    #                                 them constants): a single-row tile's row count and key

    @property
    def name(self) -> str:
        pointers = ",".join(t[1:] for t in self.signature.values() if t.startswith("*"))
        flags = ",".join([f"{k}={getattr(v, 'name', v)}" for k, v in self.constexprs.items()]
                         + [f"{k}=1" for k in self.ones])
        return (f"{self.kernel.__name__}[{pointers}; {flags}; warps={self.num_warps}, "
                f"stages={self.num_stages}]")



@functools.cache
def interpreter_problem() -> str | None:
    """Why Triton's interpreter (``TRITON_INTERPRET=1``) cannot run the kernels here, or None
    (None too when the kernels are compiled, not interpreted). Probed on a loop over a runtime
    bound, as every kernel here has, not guessed from versions: Triton 3.6's interpreter turns
    that bound into an int in a way NumPy 2.4 refuses (triton-lang/triton#9171)."""
    if not INTERPRETED:
        return None
    import numpy
    import triton
    import triton.language as tl

    @triton.jit
    def count(out_ptr, n):
        total = 0
        for _ in range(0, n, 2):
            total += 1
        tl.store(out_ptr, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        count[(1,)](out, 5)
    except Exception as error:  # the interpreter wraps what failed in its InterpreterError
        return (f"Triton {triton.__version__}'s interpreter cannot run a loop over a runtime "
                f"bound with NumPy {numpy.__version__} ({error}; triton-lang/triton#9171): "
                "install numpy<2.4 or another Triton")
    if int(out) != 3:
        return (f"Triton {triton.__version__}'s interpreter counted {int(out)} steps of "
                "range(0, 5, 2), expected 3")
    return None


def pick_tile(size: int, tiles: tuple[int, ...]) -> int:
    """The smallest of the ascending ``tiles`` that covers ``size``, else the largest."""
    return next((tile for tile in tiles if tile >= size), tiles[-1])


def rows_bucket(rows: int) -> int:
    """The autotuners' key for a count of activation rows: the next power of two, at most 4096
    (a training run's batch and a decode's single row each tune once)."""
    return min(1 << max(rows - 1, 0).bit_length(), 4096)


AUTOTUNE_WARMUP_MS, AUTOTUNE_REP_MS = 5, 20  # per candidate; do_bench's own are 25 and 100


def autotune_bench(kernel_call, quantiles):
    """How ``triton.autotune`` times each candidate: ``do_bench`` over about 25 ms instead of
    its default 125, so that a first run's hundreds of (kernel, key) pairs tune in seconds;
    the candidates differ by far more than its shorter median's noise."""
    import triton.testing
    return triton.testing.do_bench(kernel_call, warmup=AUTOTUNE_WARMUP_MS, rep=AUTOTUNE_REP_MS,
                                   quantiles=quantiles)


@functools.cache
def _autotuned(kernel, warps: tuple[int, ...], key: tuple[str, ...],
               reset_to_zero: tuple[str, ...]):
    import triton
    configs = [triton.Config({}, num_warps=w, num_stages=NUM_STAGES) for w in warps]
    return triton.autotune(configs=configs, key=list(key), do_bench=autotune_bench,
                           reset_to_zero=list(reset_to_zero) or None)(kernel)


def launch(kernel, grid, *args, warps: tuple[int, ...], key: tuple[str, ...] = (),
           reset_to_zero: tuple[str, ...] = (), **constexprs) -> None:
    """``kernel[grid](*args, **constexprs)`` with the fastest of ``warps`` for the arguments
    named in ``key`` (and the tensors' dtypes): ``triton.autotune`` times each choice once per
    key on a GPU (zeroing the buffers named in ``reset_to_zero`` before each try, for kernels
    that accumulate); the first choice under the interpreter, or when there is only one."""
    if INTERPRETED or len(warps) == 1:
        kernel[grid](*args, num_warps=warps[0], num_stages=NUM_STAGES, **constexprs)
    else:
        _autotuned(kernel, tuple(warps), tuple(key), tuple(reset_to_zero))[grid](
            *args, **constexprs)


def warp_choices(elements: int) -> tuple[int, ...]:
    """The autotune set of warps for a tile of ``elements`` loads per step: 4 below 1024 (8
    would idle lanes), 4 or 8 otherwise."""
    return (4,) if elements < 1024 else (4, 8)


PROGRAMS_PER_SM = 4  # split a reduction until the grid has this many programs per SM


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache  # (read on every call otherwise: a device query per op)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_count(programs: int, work: int, min_per_split: int, device: torch.device) -> int:
    """How many programs share one tile's reduction (``work`` items: diagonals, fan-in slots)
    so that a GPU runs ``PROGRAMS_PER_SM`` programs per SM, each keeping ``min_per_split``
    items at least; 1 off a GPU. With few activation rows the tiles alone leave most SMs
    idle (batch 1 at 4096 outputs: 32 programs for 132 SMs)."""
    if device.type != "cuda":
        return 1
    sms = _multiprocessors(device.index if device.index is not None else
                           torch.cuda.current_device())
    wanted = _ceil_div(PROGRAMS_PER_SM * sms, programs)
    return max(1, min(wanted, work // min_per_split))


@dataclass
class Split:
    """A reduction of ``work`` items shared by ``count`` programs of ``per_split`` items (a
    multiple of ``granule``), writing partial sums into ``target`` unless ``count`` is 1."""

    count: int
    per_split: int
    target: torch.Tensor

    @classmethod
    def plan(cls, wanted: int, work: int, granule: int, out: torch.Tensor) -> "Split":
        """At most ``wanted`` programs; ``out`` is the result the partial sums add up to."""
        count = max(1, min(wanted, _ceil_div(work, granule)))
        per_split = granule * _ceil_div(_ceil_div(work, count), granule)
        count = _ceil_div(work, per_split)
        target = out if count == 1 else out.new_empty(
            count, *out.shape, dtype=accumulator_dtype(out.dtype))
        return cls(count, per_split, target)

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        if self.count > 1:
            out.copy_(self.target.sum(0))
        return out


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels accumulate ``dtype`` in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


SINGLE_ROW = ("rows", "rows_key")  # Variant.ones of a tile launched only for one row


def signature(kernel, pointers: dict[str, torch.dtype], constexprs: dict[str, object],
              scalars: dict[str, str] | None = None) -> dict[str, str]:
    """The ``ASTSource`` signature of ``kernel``: pointers typed by ``pointers``, constexprs
    as such, every other argument an ``i32`` (or as ``scalars`` says)."""
    scalars = scalars or {}
    out = {}
    for name in kernel.arg_names:
        if name in constexprs:
            out[name] = "constexpr"
        elif name in pointers:
            out[name] = "*" + _TRITON_TYPES[pointers[name]]
        else:
            out[name] = scalars.get(name, "i32")
    return out
