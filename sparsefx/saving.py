"""One-file save and load of a sparse model: ``sparsefx.save`` / ``sparsefx.load``.

    sparsefx.save(sparse_model, "model.safetensors")
    sparse = sparsefx.load("model.safetensors", build_dense_model())   # meta works too

The file is a safetensors file: every tensor of the model (the sparse layers' values and
structure, and the dense rest), and in its metadata (``"sparsefx"``, JSON) each sparse
layer's class and options (shape, blockdiag's groups, N:M), the reasons the other candidate
layers stayed dense, and which entries are tied to which. So its size is about
``1 - sparsity`` of the dense model's linear weights, plus the structure (int16 ids, int64
offsets, a bool mask), plus the dense rest.

``load`` rebuilds the sparse model on the dense architecture it is given, as
``sparsefx.transform`` would (the same sites, attention swapped, functional sites
rewritten), but from the file's layers rather than from a sparsity; it checks that every
saved layer has a site of the same shape in that architecture, and loads every tensor.
"""
from __future__ import annotations

import json
import os

import torch.nn as nn

from sparsefx.dst_layers import unwrap  # torch.compile's and DDP's wrappers
from sparsefx.model_info import ModelInfo, info_of
from sparsefx.layers import SPARSE_LAYERS
from sparsefx.registry import layer_classes

__all__ = ["save", "load"]

FORMAT = 1


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model`` (from ``sparsefx.transform``, or its compiled / DDP wrapper) to
    ``path`` as one safetensors file (see the module docstring)."""
    from safetensors.torch import save_file

    model = unwrap(model)
    layers = {name: module.saved_options() for name, module in model.named_modules()
              if isinstance(module, SPARSE_LAYERS)}
    if not layers:
        raise ValueError("sparsefx.save: the model has no sparse layer: make it sparse with "
                         "sparsefx.transform first (or save it with torch.save)")
    tensors, tied, seen = {}, {}, {}
    for name, tensor in model.state_dict().items():
        if tensor.is_meta:
            raise ValueError(f"sparsefx.save: {name} is on the meta device: expected a model "
                             "holding its data (materialise it with to_empty and load it)")
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
               tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and key in seen:  # tied: one copy in the file
            tied[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous().cpu()
    info = info_of(model) or ModelInfo(order=list(layers))
    dense = {name: reason for name, (_, _, reason) in info.dense.items()}
    metadata = {"format": FORMAT, "layers": layers, "dense": dense, "tied": tied,
                "order": info.order}
    save_file(tensors, os.fspath(path), metadata={"sparsefx": json.dumps(metadata)})


def load(path: str | os.PathLike, model: nn.Module, *, leaf_modules: tuple = (),
         concrete_args: dict | None = None) -> nn.Module:
    """The sparse model ``path`` holds, rebuilt on the dense architecture ``model`` (not
    modified; on the meta device too: the result then holds the file's tensors on the CPU).
    ``leaf_modules`` and ``concrete_args`` go to the tracer, as in ``transform``. Raises a
    ``ValueError`` naming the layer if the file does not fit the architecture."""
    from safetensors import safe_open

    from sparsefx.transform import prepare, rewrite

    with safe_open(os.fspath(path), framework="pt") as file:
        header = (file.metadata() or {}).get("sparsefx")
        if header is None:
            raise ValueError(f"sparsefx.load: {path} was not written by sparsefx.save (no "
                             "'sparsefx' metadata)")
        tensors = {name: file.get_tensor(name) for name in file.keys()}
    saved = json.loads(header)
    if saved.get("format") != FORMAT:
        raise ValueError(f"sparsefx.load: {path} has format {saved.get('format')!r}: this "
                         f"sparsefx reads format {FORMAT}")
    for alias, name in saved["tied"].items():
        tensors[alias] = tensors[name]

    new, parts, functional, sites = prepare(model, leaf_modules, concrete_args)
    by_name = {site.name: site for site in sites}
    layers = saved["layers"]
    for name, options in layers.items():
        site = by_name.get(name)
        if site is None:
            raise ValueError(f"sparsefx.load: layer {name} of {path} is not a linear layer of "
                             f"this model (its candidates: {sorted(by_name)})")
        if (site.out_features, site.in_features) != (options["out_features"],
                                                     options["in_features"]):
            raise ValueError(f"sparsefx.load: layer {name} is ({options['out_features']}, "
                             f"{options['in_features']}) in {path} and "
                             f"({site.out_features}, {site.in_features}) in this model")

    def make_layer(site, weight, bias):
        options = layers[site.name]
        prefix = site.name + "."
        own = {key[len(prefix):]: value for key, value in tensors.items()
               if key.startswith(prefix) and "." not in key[len(prefix):]}
        try:
            layer = layer_classes()[options["class"]].from_saved(own, options)
        except (KeyError, ValueError) as error:
            raise ValueError(f"sparsefx.load: layer {site.name} in {path}: {error}") from None
        layer._sparsefx_name = site.name
        return layer

    new = rewrite(new, parts, functional, sites, layers, make_layer, saved["dense"])
    if any(t.is_meta for t in new.state_dict().values()):
        new.to_empty(device="cpu")  # the file holds every tensor
    new.load_state_dict(tensors)
    if hasattr(new, "tie_weights") and saved["tied"]:
        new.tie_weights()  # to_empty gave tied modules parameters of their own (HF models)
    return new
