"""Encoder -> layer chains: read the user's own module with ``torch.fx``.

``trace_chains`` walks a ``torch.fx`` graph of the module (custom ``forward`` methods work as well
as ``nn.Sequential``) and returns, for each head (mu, out2), the ops from the input: modules
(nn.Linear, nn.Conv2d, BatchNorm), activations (``ActivationOp``), head slices (``SliceOp``) and
``FLATTEN``. No weight is read here. It raises ``UnsupportedEncoder`` saying why for anything
that is not such a chain. ``pullgeom.tracing.mlp_plan`` folds MLP chains into a layer plan;
``pullgeom.tracing.layer_chain`` differentiates any chain by hand.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

# Tracing.

class UnsupportedEncoder(Exception):
    """The encoder is not a chain of layers the traced paths can reproduce (the message says why)."""


_MODULE_ACTIVATIONS = {
    nn.Tanh: "tanh", nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.ELU: "elu",
    nn.GELU: "gelu", nn.SiLU: "silu", nn.Sigmoid: "sigmoid", nn.Softplus: "softplus",
}
_FUNCTION_ACTIVATIONS = {
    torch.tanh: "tanh", F.tanh: "tanh", torch.relu: "relu", F.relu: "relu",
    F.leaky_relu: "leaky_relu", F.elu: "elu", F.gelu: "gelu", F.silu: "silu",
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.softplus: "softplus",
}
_METHOD_ACTIVATIONS = {"tanh": "tanh", "relu": "relu", "sigmoid": "sigmoid"}
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.AlphaDropout)


@dataclass
class ActivationOp:
    name: str
    param: float = 0.0
    threshold: float = 20.0

    @property
    def activation(self) -> str:
        """The name, as ``DenseLayer.activation``: ``activation_forward`` takes either."""
        return self.name


class _Flatten:
    """``x.flatten(1)`` (or Flatten / view(B, -1)): a no-op on the input of an MLP."""

    def __repr__(self) -> str:
        return "FLATTEN"


FLATTEN = _Flatten()


@dataclass
class SliceOp:
    """A contiguous range of features, from chunk/split/getitem on the heads' output."""

    start: int
    stop: int


def _activation_from_function(target, args, kwargs) -> ActivationOp | None:
    name = _FUNCTION_ACTIVATIONS.get(target)
    if name is None:
        return None

    def arg(position: int, key: str, default):
        if len(args) > position:
            return args[position]
        return kwargs.get(key, default)

    if name == "leaky_relu":
        return ActivationOp(name, float(arg(1, "negative_slope", 0.01)))
    if name == "elu":
        return ActivationOp(name, float(arg(1, "alpha", 1.0)))
    if name == "softplus":
        return ActivationOp(name, float(arg(1, "beta", 1.0)), float(arg(2, "threshold", 20.0)))
    if name == "gelu":
        return ActivationOp("gelu_tanh" if kwargs.get("approximate", "none") == "tanh" else "gelu")
    return ActivationOp(name)


def _activation_from_module(module: nn.Module) -> ActivationOp | None:
    for cls, name in _MODULE_ACTIVATIONS.items():
        if type(module) is cls:
            if name == "leaky_relu":
                return ActivationOp(name, float(module.negative_slope))
            if name == "elu":
                return ActivationOp(name, float(module.alpha))
            if name == "softplus":
                return ActivationOp(name, float(module.beta), float(module.threshold))
            if name == "gelu":
                return ActivationOp("gelu_tanh" if module.approximate == "tanh" else "gelu")
            return ActivationOp(name)
    return None


def _is_flatten_node(node: torch.fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.Flatten) and modules[node.target].start_dim == 1
    if node.op == "call_function" and node.target is torch.flatten:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        return start == 1
    if node.op == "call_method" and node.target == "flatten":
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        return start == 1
    if node.op == "call_method" and node.target in ("view", "reshape"):
        shape = node.args[1:]
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        # (B, -1), or (-1, n): the latter is a flatten when n is the per-sample size, which the
        # callers' forward checks confirm (a wrong n changes the batch size and fails them).
        return len(shape) == 2 and (shape[1] == -1 or (shape[0] == -1 and isinstance(shape[1], int)))
    return False


_SPLIT_FUNCTIONS = {torch.chunk: "chunk", torch.split: "split", torch.functional.split: "split"}


def _split_parts(node: torch.fx.Node, parent: list) -> list[SliceOp] | None:
    """The two halves selected by ``chunk(2, dim=-1)`` / ``split(half, dim=-1)`` /
    ``split([half, half], dim=-1)``, as methods or ``torch.`` functions, else None."""
    if node.op == "call_method" and node.target in ("chunk", "split"):
        kind, args = node.target, list(node.args[1:])
    elif node.op == "call_function" and node.target in _SPLIT_FUNCTIONS:
        kind, args = _SPLIT_FUNCTIONS[node.target], list(node.args[1:])
    else:
        return None
    parent_width = _width(parent)
    dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
    if dim not in (1, -1):
        return None
    size = args[0] if args else node.kwargs.get("chunks", node.kwargs.get("split_size_or_sections",
                                                                              node.kwargs.get("split_size")))
    if kind == "chunk":
        if size != 2 or parent_width % 2:
            return None
        half = parent_width // 2
    elif isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1] or sum(size) != parent_width:
            return None
        half = size[0]
    else:
        half = size
        if half * 2 != parent_width:
            return None
    return [SliceOp(0, half), SliceOp(half, parent_width)]


@dataclass(frozen=True)
class LayerChains:
    """What torch.fx found in an encoder, before any weight is read: the ops from the input as
    given to mu and to out2 ("input", then nn.Linear / nn.BatchNorm1d / nn.Conv2d /
    nn.BatchNorm2d modules, ActivationOp, SliceOp, FLATTEN; None for no-ops). Shared ops are the same
    objects in both lists (the trunk). MLP plans fold them (``fold_chains``); the lanczos
    backend differentiates any of them by hand (``pullgeom.tracing.layer_chain``)."""

    mu: list
    out2: list


def trace_chains(encoder: nn.Module) -> LayerChains:
    """The fx pass of ``trace_plan``: the encoder's op chains, or ``UnsupportedEncoder`` saying why."""
    if not isinstance(encoder, nn.Module):
        raise UnsupportedEncoder("the encoder is a plain function, not an nn.Module")
    try:
        graph_module = torch.fx.symbolic_trace(encoder)
    except Exception as error:  # fx raises many kinds on control flow and distributions
        raise UnsupportedEncoder(f"torch.fx could not trace it ({type(error).__name__}: {error})") from None
    modules = dict(graph_module.named_modules())
    # Each value is the list of ops applied to the flattened input, or a tuple of parts.
    chains: dict[torch.fx.Node, object] = {}
    output_args = None
    placeholder_seen = False
    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            if placeholder_seen:
                raise UnsupportedEncoder("the encoder takes more than one input")
            placeholder_seen = True
            chains[node] = ["input"]
            continue
        if node.op == "output":
            output_args = node.args[0]
            break
        if node.op == "get_attr":
            raise UnsupportedEncoder(f"it reads parameter {node.target} directly in forward")
        if _reads_shape(node, chains):
            # x.size(0) / x.shape[0], used by x.view(x.size(0), -1): a shape, not a tensor.
            chains[node] = _SHAPE
            continue
        inputs = [a for a in node.all_input_nodes if chains.get(a) is not _SHAPE]
        if len(inputs) != 1:
            raise UnsupportedEncoder(f"operation {node.format_node()} combines several tensors")
        parent = chains[inputs[0]]
        if node.op == "call_function" and node.target is operator.getitem:
            index = node.args[1]
            if isinstance(parent, tuple) and isinstance(index, int):
                chains[node] = parent[index]
                continue
            if isinstance(parent, list) and isinstance(index, tuple) and len(index) == 2:
                whole, part = index
                if whole == slice(None) and isinstance(part, slice) and part.step in (None, 1):
                    width = _width(parent)
                    start, stop, _ = part.indices(width)
                    chains[node] = parent + [SliceOp(start, stop)]
                    continue
            raise UnsupportedEncoder(f"unsupported indexing {node.format_node()}")
        if isinstance(parent, tuple):
            raise UnsupportedEncoder(f"{node.format_node()} applied to a tuple")
        if _is_flatten_node(node, modules):
            chains[node] = parent + [FLATTEN]
            continue
        parts = _split_parts(node, parent)
        if parts is not None:
            chains[node] = tuple(parent + [p] for p in parts)
            continue
        chains[node] = parent + [_op_of(node, modules)]
    if isinstance(output_args, torch.fx.Node) and isinstance(chains.get(output_args), tuple):
        mu_chain, s_chain = chains[output_args]  # ``return h.chunk(2, dim=-1)``: the pair itself
    elif isinstance(output_args, (tuple, list)) and len(output_args) == 2:
        mu_chain, s_chain = (chains.get(arg) for arg in output_args)
    else:
        raise UnsupportedEncoder("forward does not return a pair (mu, out2)")
    if not (isinstance(mu_chain, list) and isinstance(s_chain, list)):
        raise UnsupportedEncoder("the outputs are not computed from the input by a chain of layers")
    return LayerChains(mu_chain, s_chain)


_SHAPE = object()  # marks fx values that are shapes (x.size(0)), not tensors


def _reads_shape(node: torch.fx.Node, chains: dict) -> bool:
    if node.op == "call_method" and node.target == "size":
        return True
    if node.op == "call_function" and node.target is getattr and node.args[1] == "shape":
        return True
    return (node.op == "call_function" and node.target is operator.getitem
            and chains.get(node.args[0]) is _SHAPE)


def _width(chain: list) -> int:
    for op in reversed(chain):
        if isinstance(op, nn.Linear):
            return op.out_features
        if isinstance(op, SliceOp):
            return op.stop - op.start
    raise UnsupportedEncoder("indexing the raw input")


def _op_of(node: torch.fx.Node, modules: dict):
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, (nn.Linear, nn.BatchNorm1d, nn.Conv2d, nn.BatchNorm2d)):
            return module  # its weights are read when the chains are folded (``fold_chains``)
        if isinstance(module, _IDENTITY_MODULES):
            return None
        act = _activation_from_module(module)
        if act is not None:
            return act
        raise UnsupportedEncoder(f"module {type(module).__name__} is not an MLP layer")
    if node.op == "call_function":
        if node.target is F.dropout and not node.kwargs.get("training", True):
            return None
        act = _activation_from_function(node.target, node.args, node.kwargs)
        if act is not None:
            return act
    if node.op == "call_method":
        name = _METHOD_ACTIVATIONS.get(node.target)
        if name is not None:
            return ActivationOp(name)
    raise UnsupportedEncoder(f"operation {node.format_node()} is not an MLP layer")


def split_trunk(mu_ops: list, s_ops: list) -> tuple[list, list, list]:
    """(trunk, mu head, out2 head): the ops both chains share (the same objects, from the start)
    and what follows in each."""
    common = 0
    while common < min(len(mu_ops), len(s_ops)) and mu_ops[common] is s_ops[common]:
        common += 1
    return mu_ops[:common], mu_ops[common:], s_ops[common:]


