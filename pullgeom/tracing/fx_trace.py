"""Encoder -> layer plan: recognise an MLP encoder by tracing the user's own module.

A *layer plan* is the encoder written as a chain the analytic backends can differentiate
by hand::

    h_0 = flatten(x)                                   (B, N)
    h_l = act_l(W_l h_{l-1} + b_l)       l = 1..L      BatchNorm (eval) folded into W_l, b_l
    mu  = W_mu h_L + b_mu,   out2 = W_s h_L + b_s      (B, dz) each

``trace_plan`` walks a ``torch.fx`` graph of the module, so custom ``forward`` methods work as
well as ``nn.Sequential``, and returns ``None`` (with the reason) for anything that is not such a
chain; the caller then falls back to the ``autograd`` backend.
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger("pullgeom")

# Integer codes shared with the native kernels (csrc/, pullgeom/triton/).
ACTIVATIONS = (
    "identity", "tanh", "relu", "leaky_relu", "elu", "gelu", "gelu_tanh",
    "silu", "sigmoid", "softplus",
)
ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}


@dataclass(frozen=True)
class DenseLayer:
    """One hidden layer ``h = act(W h_prev + b)`` with BatchNorm already folded in.

    weight: (out, in); bias: (out,). ``param`` is the activation's scalar: the negative
    slope (leaky_relu), alpha (elu), beta (softplus); ``threshold`` is softplus's.
    """

    weight: Tensor
    bias: Tensor
    activation: str = "identity"
    param: float = 0.0
    threshold: float = 20.0

    @property
    def activation_code(self) -> int:
        return ACTIVATION_CODES[self.activation]


@dataclass(frozen=True)
class MLPPlan:
    """An MLP encoder as a chain: hidden ``layers`` then the two linear heads.

    head weights: (dz, w_L) where w_L is the last hidden width (N when there is no hidden
    layer); head biases: (dz,).
    """

    layers: tuple[DenseLayer, ...]
    mu_weight: Tensor
    mu_bias: Tensor
    s_weight: Tensor
    s_bias: Tensor

    @property
    def input_numel(self) -> int:
        first = self.layers[0].weight if self.layers else self.mu_weight
        return first.shape[1]

    @property
    def latent_dim(self) -> int:
        return self.mu_weight.shape[0]

    @property
    def widths(self) -> list[int]:
        """Input size, then each hidden width."""
        return [self.input_numel] + [layer.weight.shape[0] for layer in self.layers]

    def rank_bound(self, stochastic: bool) -> int:
        """Upper bound on rank(G): min(2dz (dz without sigma), every width on the way)."""
        heads = 2 * self.latent_dim if stochastic else self.latent_dim
        return min([heads] + self.widths)

    def to(self, device=None, dtype=None) -> "MLPPlan":
        def cast(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype)

        layers = tuple(
            DenseLayer(cast(layer.weight), cast(layer.bias), layer.activation, layer.param, layer.threshold)
            for layer in self.layers
        )
        return MLPPlan(layers, cast(self.mu_weight), cast(self.mu_bias),
                       cast(self.s_weight), cast(self.s_bias))


# ----------------------------------------------------------------------------------------
# Forward pass and activation derivatives (shared by the plain-torch chain and the tests).

def activation_forward(pre: Tensor, layer: DenseLayer) -> Tensor:
    kind = layer.activation
    if kind == "identity":
        return pre
    if kind == "tanh":
        return torch.tanh(pre)
    if kind == "relu":
        return torch.relu(pre)
    if kind == "leaky_relu":
        return F.leaky_relu(pre, layer.param)
    if kind == "elu":
        return F.elu(pre, layer.param)
    if kind == "gelu":
        return F.gelu(pre)
    if kind == "gelu_tanh":
        return F.gelu(pre, approximate="tanh")
    if kind == "silu":
        return F.silu(pre)
    if kind == "sigmoid":
        return torch.sigmoid(pre)
    if kind == "softplus":
        return F.softplus(pre, layer.param, layer.threshold)
    raise AssertionError(f"unknown activation {kind}")


def activation_derivative(pre: Tensor, post: Tensor, layer: DenseLayer) -> Tensor:
    """act'(pre), reusing the forward value ``post`` where the identity allows (MATH.md 2)."""
    kind = layer.activation
    if kind == "identity":
        return torch.ones_like(pre)
    if kind == "tanh":
        return 1 - post * post
    if kind == "relu":
        return (pre > 0).to(pre.dtype)
    if kind == "leaky_relu":
        # Scalars would make a float32 tensor: build the slope in pre's dtype.
        return torch.where(pre > 0, torch.ones_like(pre), torch.full_like(pre, layer.param))
    if kind == "elu":
        return torch.where(pre > 0, torch.ones_like(pre), post + layer.param)
    if kind == "gelu":
        cdf = 0.5 * (1 + torch.erf(pre / math.sqrt(2)))
        return cdf + pre * torch.exp(-0.5 * pre * pre) / math.sqrt(2 * math.pi)
    if kind == "gelu_tanh":
        c = math.sqrt(2 / math.pi)
        u = c * (pre + 0.044715 * pre**3)
        t = torch.tanh(u)
        return 0.5 * (1 + t) + 0.5 * pre * (1 - t * t) * c * (1 + 3 * 0.044715 * pre * pre)
    if kind == "silu":
        sig = torch.sigmoid(pre)
        return sig * (1 + pre * (1 - sig))
    if kind == "sigmoid":
        return post * (1 - post)
    if kind == "softplus":
        scaled = pre * layer.param
        return torch.where(scaled > layer.threshold, torch.ones_like(pre), torch.sigmoid(scaled))
    raise AssertionError(f"unknown activation {kind}")


# ----------------------------------------------------------------------------------------
# Tracing.

class NotAnMLP(Exception):
    """The module is not a chain the analytic backends understand (the message says why)."""


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
class _Affine:
    """A per-feature affine map y = scale * x + shift (an eval-mode BatchNorm1d)."""

    scale: Tensor
    shift: Tensor


@dataclass
class _Act:
    name: str
    param: float = 0.0
    threshold: float = 20.0

    @property
    def activation(self) -> str:
        """The name, as ``DenseLayer.activation``: ``activation_forward`` takes either."""
        return self.name


@dataclass
class _Linear:
    weight: Tensor
    bias: Tensor


class _Flatten:
    """``x.flatten(1)`` (or Flatten / view(B, -1)): a no-op on the input of an MLP."""

    def __repr__(self) -> str:
        return "FLATTEN"


FLATTEN = _Flatten()


@dataclass
class _Slice:
    """A contiguous range of features, from chunk/split/getitem on the heads' output."""

    start: int
    stop: int


def _batchnorm_affine(bn: nn.BatchNorm1d) -> _Affine:
    if bn.training:
        raise NotAnMLP("BatchNorm in training mode")
    if bn.running_mean is None:
        raise NotAnMLP("BatchNorm without running statistics")
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(inv_std)
    beta = bn.bias if bn.affine else torch.zeros_like(inv_std)
    scale = gamma * inv_std
    return _Affine(scale, beta - bn.running_mean * scale)


def _activation_from_function(target, args, kwargs) -> _Act | None:
    name = _FUNCTION_ACTIVATIONS.get(target)
    if name is None:
        return None

    def arg(position: int, key: str, default):
        if len(args) > position:
            return args[position]
        return kwargs.get(key, default)

    if name == "leaky_relu":
        return _Act(name, float(arg(1, "negative_slope", 0.01)))
    if name == "elu":
        return _Act(name, float(arg(1, "alpha", 1.0)))
    if name == "softplus":
        return _Act(name, float(arg(1, "beta", 1.0)), float(arg(2, "threshold", 20.0)))
    if name == "gelu":
        return _Act("gelu_tanh" if kwargs.get("approximate", "none") == "tanh" else "gelu")
    return _Act(name)


def _activation_from_module(module: nn.Module) -> _Act | None:
    for cls, name in _MODULE_ACTIVATIONS.items():
        if type(module) is cls:
            if name == "leaky_relu":
                return _Act(name, float(module.negative_slope))
            if name == "elu":
                return _Act(name, float(module.alpha))
            if name == "softplus":
                return _Act(name, float(module.beta), float(module.threshold))
            if name == "gelu":
                return _Act("gelu_tanh" if module.approximate == "tanh" else "gelu")
            return _Act(name)
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


def _split_parts(node: torch.fx.Node, parent: list) -> list[_Slice] | None:
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
    return [_Slice(0, half), _Slice(half, parent_width)]


@dataclass(frozen=True)
class LayerChains:
    """What torch.fx found in an encoder, before any weight is read: the ops from the input as
    given to mu and to out2 ("input", then nn.Linear / nn.BatchNorm1d / nn.Conv2d /
    nn.BatchNorm2d modules, _Act, _Slice, FLATTEN; None for no-ops). Shared ops are the same
    objects in both lists (the trunk). MLP plans fold them (``fold_chains``); the lanczos
    backend differentiates any of them by hand (``pullgeom.tracing.layer_chain``)."""

    mu: list
    out2: list


def trace_plan(encoder: nn.Module) -> MLPPlan:
    """Trace ``encoder`` into an ``MLPPlan`` or raise ``NotAnMLP`` saying why.

    The module must be in eval mode (BatchNorm folded with running statistics).
    """
    return fold_chains(trace_chains(encoder))


def trace_chains(encoder: nn.Module) -> LayerChains:
    """The fx pass of ``trace_plan``: the encoder's op chains, or ``NotAnMLP`` saying why."""
    if not isinstance(encoder, nn.Module):
        raise NotAnMLP("the encoder is a plain function, not an nn.Module")
    try:
        graph_module = torch.fx.symbolic_trace(encoder)
    except Exception as error:  # fx raises many kinds on control flow and distributions
        raise NotAnMLP(f"torch.fx could not trace it ({type(error).__name__}: {error})") from None
    modules = dict(graph_module.named_modules())
    # Each value is the list of ops applied to the flattened input, or a tuple of parts.
    chains: dict[torch.fx.Node, object] = {}
    output_args = None
    placeholder_seen = False
    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            if placeholder_seen:
                raise NotAnMLP("the encoder takes more than one input")
            placeholder_seen = True
            chains[node] = ["input"]
            continue
        if node.op == "output":
            output_args = node.args[0]
            break
        if node.op == "get_attr":
            raise NotAnMLP(f"it reads parameter {node.target} directly in forward")
        if _reads_shape(node, chains):
            # x.size(0) / x.shape[0], used by x.view(x.size(0), -1): a shape, not a tensor.
            chains[node] = _SHAPE
            continue
        inputs = [a for a in node.all_input_nodes if chains.get(a) is not _SHAPE]
        if len(inputs) != 1:
            raise NotAnMLP(f"operation {node.format_node()} combines several tensors")
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
                    chains[node] = parent + [_Slice(start, stop)]
                    continue
            raise NotAnMLP(f"unsupported indexing {node.format_node()}")
        if isinstance(parent, tuple):
            raise NotAnMLP(f"{node.format_node()} applied to a tuple")
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
        raise NotAnMLP("forward does not return a pair (mu, out2)")
    if not (isinstance(mu_chain, list) and isinstance(s_chain, list)):
        raise NotAnMLP("the outputs are not computed from the input by a chain of layers")
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
        if isinstance(op, _Slice):
            return op.stop - op.start
    raise NotAnMLP("indexing the raw input")


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
        raise NotAnMLP(f"module {type(module).__name__} is not an MLP layer")
    if node.op == "call_function":
        if node.target is F.dropout and not node.kwargs.get("training", True):
            return None
        act = _activation_from_function(node.target, node.args, node.kwargs)
        if act is not None:
            return act
    if node.op == "call_method":
        name = _METHOD_ACTIVATIONS.get(node.target)
        if name is not None:
            return _Act(name)
    raise NotAnMLP(f"operation {node.format_node()} is not an MLP layer")


def _resolve(op):
    """A chain op with the module's current weights read: nn.Linear -> _Linear, BatchNorm -> _Affine."""
    if isinstance(op, nn.Linear):
        bias = op.bias if op.bias is not None else op.weight.new_zeros(op.out_features)
        return _Linear(op.weight.detach(), bias.detach())
    if isinstance(op, nn.BatchNorm1d):
        return _batchnorm_affine(op)
    return op


def fold_chains(chains: LayerChains) -> MLPPlan:
    """The plan of traced chains, from the modules' weights as they are now.

    Pure torch and Python over the chains, so torch.compile traces it: a compiled spectrum
    re-reads the weights on every call instead of keeping the ones of its first call.
    """
    trunk, mu_head, s_head = ([_resolve(op) for op in ops]
                              for ops in split_trunk(*(_mlp_ops(chain) for chain in (chains.mu, chains.out2))))
    # Two separate heads: [Linear] each. One shared head: trunk ends with Linear, each
    # branch is [Slice].
    if len(mu_head) == 1 and len(s_head) == 1 and all(isinstance(h[0], _Slice) for h in (mu_head, s_head)):
        if not trunk or not isinstance(trunk[-1], _Linear):
            raise NotAnMLP("the heads are slices of something other than a Linear output")
        shared = trunk.pop()
        mu_lin = _Linear(shared.weight[mu_head[0].start:mu_head[0].stop],
                         shared.bias[mu_head[0].start:mu_head[0].stop])
        s_lin = _Linear(shared.weight[s_head[0].start:s_head[0].stop],
                        shared.bias[s_head[0].start:s_head[0].stop])
    elif len(mu_head) == 1 and len(s_head) == 1 and all(isinstance(h[0], _Linear) for h in (mu_head, s_head)):
        mu_lin, s_lin = mu_head[0], s_head[0]
    else:
        raise NotAnMLP("the mu and sigma heads are not two Linear layers or one split Linear")
    if mu_lin.weight.shape != s_lin.weight.shape:
        raise NotAnMLP("the mu and sigma heads have different sizes")
    layers = _fold_trunk(trunk)
    # A trailing affine (BatchNorm after the last activation) folds into the heads.
    if layers and isinstance(layers[-1], _Affine):
        affine = layers.pop()
        mu_lin, s_lin = (_Linear(head.weight * affine.scale, head.bias + head.weight @ affine.shift)
                         for head in (mu_lin, s_lin))
    return MLPPlan(tuple(layers), mu_lin.weight, mu_lin.bias, s_lin.weight, s_lin.bias)


def split_trunk(mu_ops: list, s_ops: list) -> tuple[list, list, list]:
    """(trunk, mu head, out2 head): the ops both chains share (the same objects, from the start)
    and what follows in each."""
    common = 0
    while common < min(len(mu_ops), len(s_ops)) and mu_ops[common] is s_ops[common]:
        common += 1
    return mu_ops[:common], mu_ops[common:], s_ops[common:]


def _mlp_ops(chain: list) -> list:
    """The chain's ops after the input, no-ops and a leading flatten dropped (the plan works on
    flattened inputs); ``NotAnMLP`` for convolutions or a flatten between layers."""
    ops = [op for op in chain[1:] if op is not None]
    while ops and ops[0] is FLATTEN:
        ops.pop(0)
    for op in ops:
        if isinstance(op, (nn.Conv2d, nn.BatchNorm2d)):
            raise NotAnMLP(f"it has {type(op).__name__} layers, which an MLP plan cannot hold "
                           "(backend 'lanczos' runs such layer chains)")
        if op is FLATTEN:
            raise NotAnMLP("flatten after the first layer")
    return ops


def _fold_trunk(ops: list) -> list:
    """Fold BatchNorms into Linears and attach activations; ends in DenseLayers (+ _Affine)."""
    layers: list = []
    pending_affine: _Affine | None = None  # BatchNorm after an activation: folds forward
    for op in ops:
        if isinstance(op, _Linear):
            weight, bias = op.weight, op.bias
            if pending_affine is not None:
                bias = bias + weight @ pending_affine.shift
                weight = weight * pending_affine.scale
                pending_affine = None
            layers.append(DenseLayer(weight, bias))
        elif isinstance(op, _Affine):
            last = layers[-1] if layers else None
            if isinstance(last, DenseLayer) and last.activation == "identity" and pending_affine is None:
                layers[-1] = DenseLayer(last.weight * op.scale[:, None], last.bias * op.scale + op.shift)
            elif pending_affine is None:
                pending_affine = op
            else:
                pending_affine = _Affine(pending_affine.scale * op.scale,
                                         pending_affine.shift * op.scale + op.shift)
        elif isinstance(op, _Act):
            if pending_affine is not None:
                raise NotAnMLP("an activation after a BatchNorm that follows an activation")
            last = layers[-1] if layers else None
            if not isinstance(last, DenseLayer) or last.activation != "identity":
                raise NotAnMLP("an activation that does not follow a Linear layer")
            layers[-1] = DenseLayer(last.weight, last.bias, op.name, op.param, op.threshold)
        elif isinstance(op, _Slice):
            raise NotAnMLP("slicing inside the trunk")
    if pending_affine is not None:
        layers.append(pending_affine)
    return layers


_notified: set[int] = set()


def plan_or_none(encoder) -> tuple[MLPPlan | None, LayerChains | None, str]:
    """The encoder's plan and the chains it was folded from, or ``(None, None, reason)``;
    logs the fallback once per encoder."""
    try:
        chains = trace_chains(encoder)
        with torch.no_grad():
            return fold_chains(chains), chains, ""
    except NotAnMLP as reason:
        key = id(encoder)
        if key not in _notified:
            _notified.add(key)
            log.info("pullgeom: %s is not a recognised MLP (%s); backend 'auto' runs it on the autograd "
                     "backend (or on lanczos when its Jacobian is too large to hold)", type(encoder).__name__, reason)
        return None, None, str(reason)


def plan_forward(plan: MLPPlan, x2d: Tensor) -> tuple[Tensor, Tensor]:
    """``(mu, out2)`` of the plan on flattened inputs ``x2d: (B, N)``; used to check a plan."""
    h = x2d
    for layer in plan.layers:
        h = activation_forward(h @ layer.weight.T + layer.bias, layer)
    return h @ plan.mu_weight.T + plan.mu_bias, h @ plan.s_weight.T + plan.s_bias
