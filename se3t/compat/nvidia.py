"""Load checkpoints of NVIDIA's DGL SE(3)-Transformer (DeepLearningExamples) into se3t.

What the conversion does (everything else maps one to one, same parameter names):

* Radial MLPs: the reference owns one radial MLP per conv (its FULL fusion), per output degree (PARTIAL,
  ``conv_out``), per input degree (PARTIAL, ``conv_in``) or per degree pair (NONE / low memory). The layout is
  read from the checkpoint's keys for every conv; se3t builds the same parametrization and permutes the rows
  of each last radial layer into se3t's layout (see :mod:`se3t.nn.conv`).
* The reference's pairwise 0->0 path multiplies by no basis at all, where the true basis is
  ``Y_0 * CG = 1/sqrt(4 pi)``; se3t uses the true basis everywhere, so those rows are scaled by ``sqrt(4 pi)``.
* Clebsch–Gordan signs: e3nn 0.3.3 (the reference's pin) returns ``wigner_3j(J, l1, l2)`` with the opposite sign
  from e3nn >= 0.5 for the triples in :data:`E3NN_033_SIGN_FLIPS`. se3t always uses the modern coefficients;
  for ``e3nn_version="0.3.3"`` the flipped frequencies' radial rows are negated instead.
* The self-interaction of the final conv is added on every edge in the reference: the converted model is
  built with ``reference_parity=True``.

The reference's NormSE3 for non-uniform channel counts swaps arguments and is not equivariant; se3t's NormSE3
is correct, so such (unusual) models will not reproduce the reference's outputs there.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..basis import num_frequencies
from ..fiber import Fiber
from ..model import SE3Transformer, SE3TransformerPooled
from ..nn.conv import ConvSE3

__all__ = ["E3NN_033_SIGN_FLIPS", "convert_state_dict", "load_nvidia", "build_model", "reference_radial_layout",
           "convert_checkpoint", "cli_main"]

#: ``(J, d_in, d_out)`` whose ``wigner_3j`` sign differs between e3nn 0.3.3 and e3nn >= 0.5 (J <= 6, l <= 3).
E3NN_033_SIGN_FLIPS = frozenset({(1, 2, 2), (2, 1, 2), (2, 2, 1), (1, 3, 3), (3, 1, 3), (3, 3, 1)})
_FIBER_KEYS = ("fiber_in", "fiber_hidden", "fiber_out", "fiber_edge")
_RADIAL_OF_KIND = {"full": "conv", "out": "output_degree", "in": "input_degree", "pair": "pair"}


class CheckpointMismatchError(ValueError):
    """The state dict does not fit the configuration."""


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------
def _fiber(value: Any) -> Fiber:
    if isinstance(value, Fiber):
        return value
    return Fiber({int(k): int(v) for k, v in dict(value or {}).items()})


def _transformer_args(config: Mapping[str, Any]) -> Dict[str, Any]:
    """The reference SE3Transformer constructor arguments implied by ``config``."""
    cls = config.get("model_class", "SE3TransformerPooled" if "num_degrees" in config else "SE3Transformer")
    if cls == "SE3TransformerPooled":
        hidden = Fiber.create(int(config["num_degrees"]), int(config["num_channels"]))
        return dict(num_layers=int(config.get("num_layers", 7)), fiber_in=_fiber(config["fiber_in"]),
                    fiber_hidden=hidden, fiber_out=_fiber(config["fiber_out"]),
                    fiber_edge=_fiber(config.get("fiber_edge")))
    if cls != "SE3Transformer":
        raise ValueError(f"unknown model_class {cls!r}: expected 'SE3Transformer' or 'SE3TransformerPooled'")
    return dict(num_layers=int(config["num_layers"]), fiber_in=_fiber(config["fiber_in"]),
                fiber_hidden=_fiber(config["fiber_hidden"]), fiber_out=_fiber(config["fiber_out"]),
                fiber_edge=_fiber(config.get("fiber_edge")))


def se3t_kwargs(config: Mapping[str, Any], radial: Union[str, List[str]] = "conv") -> Tuple[str, Dict[str, Any]]:
    """``(class name, se3t constructor kwargs)`` for a reference configuration (fibers as plain dicts)."""
    cls = config.get("model_class", "SE3TransformerPooled" if "num_degrees" in config else "SE3Transformer")
    common = dict(norm=bool(config.get("norm", True)), use_layer_norm=bool(config.get("use_layer_norm", True)),
                  low_memory=bool(config.get("low_memory", False)), radial=radial, reference_parity=True)
    if cls == "SE3TransformerPooled":
        kw = dict(fiber_in=_fiber(config["fiber_in"]).as_dict(), fiber_out=_fiber(config["fiber_out"]).as_dict(),
                  fiber_edge=_fiber(config.get("fiber_edge")).as_dict(), num_degrees=int(config["num_degrees"]),
                  num_channels=int(config["num_channels"]), output_dim=int(config.get("output_dim", 1)),
                  num_layers=int(config.get("num_layers", 7)), num_heads=int(config.get("num_heads", 8)),
                  channels_div=int(config.get("channels_div", 2)), pooling=config.get("pooling") or "max", **common)
        return cls, kw
    args = _transformer_args(config)
    kw = dict(num_layers=args["num_layers"], fiber_in=args["fiber_in"].as_dict(),
              fiber_hidden=args["fiber_hidden"].as_dict(), fiber_out=args["fiber_out"].as_dict(),
              num_heads=int(config["num_heads"]), channels_div=int(config["channels_div"]),
              fiber_edge=args["fiber_edge"].as_dict(), return_type=config.get("return_type"),
              pooling=config.get("pooling"), **common)
    return cls, kw


def build_model(model_class: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """Instantiate an se3t model from ``(class name, kwargs)`` with fibers given as dicts."""
    kw = dict(kwargs)
    for k in _FIBER_KEYS:
        if k in kw:
            kw[k] = _fiber(kw[k])
    if model_class == "SE3TransformerPooled":
        return SE3TransformerPooled(**kw)
    if model_class == "SE3Transformer":
        return SE3Transformer(**kw)
    raise ValueError(f"unknown model_class {model_class!r}")


# ----------------------------------------------------------------------------------------------------------------
# State dict handling
# ----------------------------------------------------------------------------------------------------------------
def _unwrap(obj: Any) -> Dict[str, Tensor]:
    """The model state dict inside a checkpoint (``{'state_dict': ...}`` as the reference saves it), DDP
    ``module.`` prefixes removed."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointMismatchError("not a state dict: expected a mapping of parameter names to tensors "
                                      "(or a checkpoint dict with a 'state_dict' entry)")
    out = {}
    for k, v in obj.items():
        while k.startswith("module."):
            k = k[len("module."):]
        out[k] = v
    return out


def _conv_prefixes(model: nn.Module) -> Dict[str, ConvSE3]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ConvSE3)}


def _kind_of(sd: Mapping[str, Tensor], prefix: str) -> str:
    """Which radial layout the reference used for the conv at ``prefix`` (from its keys)."""
    p = prefix + "." if prefix else ""
    if f"{p}conv.radial_func.net.0.weight" in sd:
        return "full"
    if any(k.startswith(f"{p}conv_out.") for k in sd):
        return "out"
    if any(k.startswith(f"{p}conv_in.") for k in sd):
        return "in"
    if any(k.startswith(f"{p}conv.") and k[len(p) + 5:].split(".")[0].count(",") == 1 for k in sd):
        return "pair"
    raise CheckpointMismatchError(f"no radial weights found for the conv '{prefix}' (expected keys like "
                                  f"'{p}conv.0,0.radial_func...', '{p}conv_out.0...', '{p}conv_in.0...' or "
                                  f"'{p}conv.radial_func...')")


def reference_radial_layout(nvidia_state_dict: Mapping[str, Tensor], config: Mapping[str, Any]) -> List[str]:
    """se3t ``radial`` setting of every conv (attention blocks, then the final conv) for a reference checkpoint."""
    sd = _unwrap(nvidia_state_dict)
    cls, kw = se3t_kwargs(config)
    probe = build_model(cls, {**kw, "radial": "pair"})
    return [_RADIAL_OF_KIND[_kind_of(sd, prefix)] for prefix in _conv_prefixes(probe)]


def _nvidia_rows(conv: ConvSE3, kind: str, d_in: int, d_out: int) -> Tuple[str, Tensor]:
    """(reference module name, row indices ``[C_out, C_in * F]``) of one pair's radial weights."""
    c_in, c_out = conv.in_channels[d_in], conv.fiber_out[d_out]
    F = num_frequencies(d_in, d_out)
    d_ins, d_outs = conv.fiber_in.degrees, conv.fiber_out.degrees
    if kind == "pair":
        module, f_off, f_tot = f"conv.{d_in},{d_out}", 0, F
    elif kind == "out":
        module = f"conv_out.{d_out}"
        f_off = sum(num_frequencies(d, d_out) for d in d_ins if d < d_in)
        f_tot = sum(num_frequencies(d, d_out) for d in d_ins)
    elif kind == "in":
        module = f"conv_in.{d_in}"
        f_off = sum(num_frequencies(d_in, d) for d in d_outs if d < d_out)
        f_tot = sum(num_frequencies(d_in, d) for d in d_outs)
    else:  # full: frequencies ordered by d_out, then d_in, then J
        module = "conv"
        order = [(di, do) for do in d_outs for di in d_ins]
        f_off = sum(num_frequencies(*p) for p in order[:order.index((d_in, d_out))])
        f_tot = sum(num_frequencies(*p) for p in order)
    o = torch.arange(c_out).view(-1, 1, 1)
    i = torch.arange(c_in).view(1, -1, 1)
    f = torch.arange(F).view(1, 1, -1)
    return module, (o * (c_in * f_tot) + i * f_tot + f_off + f).reshape(c_out, c_in * F)


def _row_factors(conv: ConvSE3, kind: str, d_in: int, d_out: int, e3nn_version: str) -> Tensor:
    """Per-frequency factor ``[F]`` applied to the converted rows (CG signs, the missing 0->0 basis)."""
    F = num_frequencies(d_in, d_out)
    factors = torch.ones(F, dtype=torch.float64)
    if e3nn_version == "0.3.3":
        for f, J in enumerate(range(abs(d_in - d_out), d_in + d_out + 1)):
            if (J, d_in, d_out) in E3NN_033_SIGN_FLIPS:
                factors[f] = -1.0
    if kind == "pair" and d_in == 0 and d_out == 0:
        factors *= math.sqrt(4 * math.pi)  # reference: R @ x, no Y_0 * CG factor
    return factors


def _convert_conv(sd: Dict[str, Tensor], prefix: str, conv: ConvSE3, e3nn_version: str,
                  out: Dict[str, Tensor], used: set) -> None:
    kind = _kind_of(sd, prefix)
    p = prefix + "." if prefix else ""
    for g, mlp in enumerate(conv.radial):
        blocks = [b for d_out in conv.fiber_out.degrees for b in conv._blocks[d_out] if b.group == g]
        rows, factors, source = [], [], None
        for b in blocks:
            per_in = []
            fac_in = []
            for d_in in b.d_ins:
                module, r = _nvidia_rows(conv, kind, d_in, b.d_out)
                if source not in (None, module):
                    raise AssertionError("one se3t radial group must come from one reference module")
                source = module
                per_in.append(r)
                fac = _row_factors(conv, kind, d_in, b.d_out, e3nn_version)
                fac_in.append(fac.repeat(conv.in_channels[d_in]).expand(r.shape[0], -1))
            rows.append(torch.cat(per_in, dim=1).reshape(-1))
            factors.append(torch.cat(fac_in, dim=1).reshape(-1))
        rows_t, fac_t = torch.cat(rows), torch.cat(factors)
        src = f"{p}{source}.radial_func.net."
        # Hidden layers: same modules, same indices.
        for name, param in mlp.net.named_parameters():
            idx = name.split(".")[0]
            key = src + name
            if key not in sd:
                raise CheckpointMismatchError(f"missing key '{key}' in the reference state dict")
            used.add(key)
            if idx == str(len(mlp.net) - 1):  # last layer: permute rows, apply factors
                W = sd[key]
                # The group's rows cover the reference module's rows exactly once when the config matches.
                if W.dim() != 2 or W.shape[0] != rows_t.numel() or W.shape[1] != param.shape[1]:
                    raise CheckpointMismatchError(f"shape mismatch for '{key}': checkpoint {list(W.shape)}, "
                                                  f"configuration expects [{rows_t.numel()}, {param.shape[1]}]")
                W = W[rows_t] * fac_t.to(W.dtype)[:, None]
                out[f"{p}radial.{g}.net.{name}"] = W
            else:
                if sd[key].shape != param.shape:
                    raise CheckpointMismatchError(f"shape mismatch for '{key}': checkpoint {list(sd[key].shape)}, "
                                                  f"configuration expects {list(param.shape)}")
                out[f"{p}radial.{g}.net.{name}"] = sd[key]


def _e3nn_version(version: str) -> str:
    v = str(version)
    if v == "0.3.3":
        return "0.3.3"
    try:
        major, minor = (int(x) for x in v.split(".")[:2])
    except ValueError:
        raise ValueError(f"e3nn_version must look like '0.3.3' or '0.6.0', got {version!r}") from None
    if (major, minor) >= (0, 5):
        return "0.6.0"
    raise ValueError(f"e3nn_version {version!r} is not supported: use '0.3.3' (the reference's pin) or any >= 0.5")


def convert_state_dict(nvidia_state_dict: Mapping[str, Any], config: Mapping[str, Any],
                       e3nn_version: str = "0.3.3") -> Dict[str, Tensor]:
    """Convert a reference state dict (or training checkpoint) to an se3t state dict for the model that
    :func:`load_nvidia` builds from ``config``. Raises :class:`CheckpointMismatchError` naming the first
    missing/unexpected key or shape mismatch."""
    version = _e3nn_version(e3nn_version)
    sd = _unwrap(nvidia_state_dict)
    cls, kw = se3t_kwargs(config, reference_radial_layout(sd, config))
    model = build_model(cls, kw)
    target = model.state_dict()
    out: Dict[str, Tensor] = {}
    used: set = set()
    for prefix, conv in _conv_prefixes(model).items():
        _convert_conv(sd, prefix, conv, version, out, used)
    for name, param in target.items():
        if name in out:
            continue
        if name not in sd:
            raise CheckpointMismatchError(f"missing key '{name}' in the reference state dict "
                                          f"(configuration {cls} {config})")
        if sd[name].shape != param.shape:
            raise CheckpointMismatchError(f"shape mismatch for '{name}': checkpoint {list(sd[name].shape)}, "
                                          f"configuration expects {list(param.shape)}")
        out[name] = sd[name]
        used.add(name)
    unexpected = [k for k in sd if k not in used]
    if unexpected:
        raise CheckpointMismatchError(f"unexpected key '{unexpected[0]}' in the reference state dict "
                                      f"({len(unexpected)} unexpected in all): the configuration does not match")
    return {k: out[k] for k in target}


def _load_file(path: Union[str, os.PathLike]) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    except Exception as exc:  # pickle refusals and corrupt files
        raise ValueError(f"could not read checkpoint {path} safely (torch.load weights_only=True): {exc}") from exc


def load_nvidia(path_or_state_dict: Union[str, os.PathLike, Mapping[str, Any]], config: Mapping[str, Any],
                e3nn_version: str = "0.3.3", dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Build the se3t model for ``config`` (the reference constructor arguments, fibers as dicts, plus
    ``model_class``) and load the reference checkpoint into it. ``e3nn_version`` is the e3nn the checkpoint
    was trained with: ``"0.3.3"`` (the reference's pin, default) or any version >= 0.5."""
    obj = path_or_state_dict if isinstance(path_or_state_dict, Mapping) else _load_file(path_or_state_dict)
    sd = _unwrap(obj)
    cls, kw = se3t_kwargs(config, reference_radial_layout(sd, config))
    model = build_model(cls, kw)
    model.load_state_dict(convert_state_dict(sd, config, e3nn_version), strict=True)
    model.se3t_config = {"model_class": cls, "kwargs": kw}
    if dtype is not None:
        model = model.to(dtype)
    return model


def convert_checkpoint(ckpt_path: Union[str, os.PathLike], config: Mapping[str, Any],
                       out_path: Union[str, os.PathLike], e3nn_version: str = "0.3.3") -> Dict[str, Any]:
    """Convert a reference checkpoint file into an se3t checkpoint file (written atomically).

    The file holds ``model_class``, ``model_kwargs`` (plain types) and ``state_dict``: it loads with
    ``torch.load(..., weights_only=True)`` and :func:`se3t.compat.nvidia.build_model`.
    """
    obj = _load_file(ckpt_path)
    sd = _unwrap(obj)
    cls, kw = se3t_kwargs(config, reference_radial_layout(sd, config))
    payload = {"format": "se3t", "model_class": cls, "model_kwargs": kw,
               "state_dict": convert_state_dict(sd, config, e3nn_version),
               "source": {"converted_from": "nvidia", "e3nn_version": _e3nn_version(e3nn_version),
                          "path": os.path.basename(str(ckpt_path))}}
    if isinstance(obj, Mapping) and "epoch" in obj:
        payload["source"]["epoch"] = int(obj["epoch"])
    out_path = os.fspath(out_path)
    directory = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".se3t-convert-", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return payload


def cli_main(argv: Optional[List[str]] = None) -> int:
    """``se3t convert-nvidia CKPT --config CONFIG.json -o OUT [--e3nn-version 0.3.3]``."""
    parser = argparse.ArgumentParser(prog="se3t convert-nvidia",
                                     description="Convert a checkpoint of NVIDIA's DGL SE(3)-Transformer to se3t.")
    parser.add_argument("checkpoint", help="reference checkpoint (.pth): a state dict or the training script's dict")
    parser.add_argument("--config", required=True,
                        help="JSON file (or inline JSON) with the reference constructor arguments and model_class, "
                             'e.g. {"model_class": "SE3TransformerPooled", "fiber_in": {"0": 6}, ...}')
    parser.add_argument("-o", "--output", required=True, help="se3t checkpoint to write")
    parser.add_argument("--e3nn-version", "--e3nn_version", default="0.3.3",
                        help="e3nn version the checkpoint was trained with (default 0.3.3, the reference's pin)")
    args = parser.parse_args(argv)
    try:
        text = args.config
        if os.path.exists(text):
            with open(text) as fh:
                text = fh.read()
        config = json.loads(text)
        payload = convert_checkpoint(args.checkpoint, config, args.output, args.e3nn_version)
    except (ValueError, FileNotFoundError, KeyError, json.JSONDecodeError) as exc:
        print(f"se3t convert-nvidia: error: {exc}", file=sys.stderr)
        return 2
    n = sum(t.numel() for t in payload["state_dict"].values())
    print(f"wrote {args.output}: {payload['model_class']} with {n:,} parameters "
          f"(e3nn {payload['source']['e3nn_version']} signs)")
    return 0
