"""J v and J^T u of any function at one point, from a tape of the aten ops its forward ran.

``OpTape(fn, x)`` runs ``fn(x)`` once under a ``TorchDispatchMode`` that records every aten op
reached from x (its function, arguments and outputs; ops on weights alone are constants and are
not recorded). A product then walks the tape: forwards for v -> J v, each op's tangent from its
inputs' tangents, backwards for u -> J^T u, each op's input cotangents from its outputs'. The
primal values every rule needs are the tensors the recorded forward already produced, so the
forward never reruns and no autograd graph is kept.

Why a tape rather than ``torch.func`` graphs: PyTorch has no replayable J v. The double-VJP
(the VJP of a recorded ``torch.func.vjp``, linear in its cotangent) replays the convolutions'
double backward, which always computes the weight gradient too, and ``torch.func.jvp`` reruns
the forward for every product. Here the ops that carry the FLOPs have rules by hand, each one
kernel: a convolution's tangent is the convolution of the input tangent (no bias), its
cotangent PyTorch's input-only ``convolution_backward``; GroupNorm's Jacobian at x is
diag(gamma) J_hat with J_hat = rstd (I - 11^T/n - xhat xhat^T/n) per group, symmetric, so both
directions are ``native_group_norm_backward`` (gamma applied after, for J v); SiLU both ways is
``silu_backward``; sums, scalings and views map tangents as they map values. Every other op
gets PyTorch's own derivative, ``torch.func.jvp`` / ``torch.func.vjp`` of that op alone at its
recorded inputs: a small op's forward again, nothing more. On Stable Diffusion's VAE encoder
(3 x 256 x 256) a product costs about two forwards against 3.7 for the replayed ``torch.func``
graphs (BENCHMARKS.md, "Stable Diffusion's VAE encoder").

What a tape cannot do, and says so (``UnsupportedTape``): an op that writes into a tensor
reached from x (in-place ops: the recorded input would no longer hold the value the op saw;
callers then use ``torch.func`` graphs), and an op with neither a forward-mode derivative nor a
double backward (found on the first product; no other way differentiates it either). The
derivative taken is that of the ops the forward ran: a custom ``autograd.Function``'s hand-written
backward is not consulted (its forward's ops are differentiated as they are).

Shapes: x (B, *S); ``out = fn(x)`` any shape; ``jvp(v)`` takes v shaped like x and returns a
tensor shaped like ``out``; ``vjp(u)`` the reverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

aten = torch.ops.aten


class UnsupportedTape(RuntimeError):
    """The function ran an op the tape cannot differentiate (the message names it)."""


@dataclass
class TapedOp:
    """One recorded op: ``func(*args, **kwargs)``, its arguments also flattened (``flat``, the
    pytree leaves, ``spec`` rebuilds them), ``live``: the positions in ``flat`` of the tensors
    reached from x (position 0 is ``args[0]`` when that is a tensor), ``outputs``: its outputs
    flattened (None where one is not a tensor)."""

    func: object
    args: tuple
    kwargs: dict
    flat: list
    spec: object
    live: list[int]
    outputs: list

    def call(self, replaced: dict[int, object]):
        """``func`` with the flat arguments at the positions of ``replaced`` swapped."""
        flat = [replaced.get(i, a) for i, a in enumerate(self.flat)]
        args, kwargs = tree_unflatten(flat, self.spec)
        return self.func(*args, **kwargs)

    def arg(self, i: int):
        return self.flat[i]

    def argument(self, name: str):
        """The argument called ``name`` in ``func``'s schema: as passed, else its default."""
        for position, spec in enumerate(self.func._schema.arguments):
            if spec.name == name:
                if position < len(self.args):
                    return self.args[position]
                return self.kwargs.get(name, spec.default_value)
        raise KeyError(f"{self.func} has no argument {name!r}")

    def with_tensors(self, replace) -> "TapedOp":
        """This op with every tensor t (arguments and outputs) swapped for ``replace(t)``."""
        flat = [replace(a) for a in self.flat]
        args, kwargs = tree_unflatten(flat, self.spec)
        return TapedOp(self.func, args, kwargs, flat, self.spec, self.live, [replace(o) for o in self.outputs])

    def differentiable_outputs(self) -> list[int]:
        """Positions in ``outputs`` of the floating-point tensors (the ones with derivatives)."""
        return [j for j, o in enumerate(self.outputs) if o is not None and (o.is_floating_point() or o.is_complex())]

    def as_function(self):
        """(live inputs...) -> (its differentiable outputs...), the other arguments as recorded:
        the op alone, for ``torch.func`` transforms."""
        positions = self.differentiable_outputs()

        def fn(*live):
            flat = tree_flatten(self.call(dict(zip(self.live, live))))[0]
            return tuple(flat[j] for j in positions)

        return fn


class _Recorder(TorchDispatchMode):
    """Records the ops reached from ``x`` (see the module doc)."""

    def __init__(self, x: Tensor):
        super().__init__()
        self.reached = {id(x)}
        self.ops: list[TapedOp] = []
        self.mutating: str | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat, spec = tree_flatten((args, kwargs))
        live = [i for i, a in enumerate(flat) if isinstance(a, Tensor) and id(a) in self.reached]
        # detach's result is a constant (autograd also calls it on the tensors it saves).
        if live and func is not aten.detach.default:
            if func._schema.is_mutable and self.mutating is None:
                self.mutating = str(func)
            op = TapedOp(func, args, kwargs, flat, spec, live,
                         [o if isinstance(o, Tensor) else None for o in tree_flatten(out)[0]])
            # Integer and boolean results (comparisons, indices) carry no derivative: an op with
            # no other results is not part of the Jacobian.
            if op.differentiable_outputs():
                self.reached.update(id(op.outputs[j]) for j in op.differentiable_outputs())
                self.ops.append(op)
        return out


def _channel_view(weight: Tensor, like: Tensor) -> Tensor:
    """A per-channel (C,) vector shaped to broadcast over ``like: (B, C, *spatial)``."""
    return weight.view(1, -1, *([1] * (like.dim() - 2)))


def _same_layout(vector: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(vector, x) both dense in x's memory format: ``native_group_norm_backward`` reads its
    gradient and input as laid out that way (a transposed gradient, as the attention block's
    GroupNorm over (B, C, tokens) receives, gives wrong values otherwise)."""
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return vector.contiguous(memory_format=layout), x.contiguous(memory_format=layout)


def _diagonal_product(op: TapedOp, vector: Tensor) -> Tensor | None:
    """f'(x) * vector for an elementwise activation or an eval-mode BatchNorm (per channel) of
    one live input, by the op's own backward kernel: their Jacobian is diagonal, so this is both
    J v and J^T u. None for any other op."""
    func = op.func
    if op.live != [0]:
        return None
    x, y = op.arg(0), op.outputs[0]
    if func is aten.silu.default:
        return aten.silu_backward(vector, x)
    if func is aten.tanh.default:
        return aten.tanh_backward(vector, y)
    if func is aten.sigmoid.default:
        return aten.sigmoid_backward(vector, y)
    if func is aten.relu.default:
        return aten.threshold_backward(vector, y, 0)
    if func is aten.gelu.default:
        return aten.gelu_backward(vector, x, approximate=op.argument("approximate"))
    if func is aten.leaky_relu.default:
        return aten.leaky_relu_backward(vector, x, op.argument("negative_slope"), False)
    if func is aten.elu.default:
        return aten.elu_backward(vector, op.argument("alpha"), op.argument("scale"), op.argument("input_scale"),
                                 False, x)
    if func is aten.softplus.default:
        return aten.softplus_backward(vector, x, op.argument("beta"), op.argument("threshold"))
    if func is aten.native_batch_norm.default and not op.argument("training"):
        scale = torch.rsqrt(op.argument("running_var") + op.argument("eps"))
        weight = op.argument("weight")
        scale = scale if weight is None else scale * weight
        return vector * _channel_view(scale, vector)
    return None


def _total(terms: list) -> Tensor:
    """The sum of the terms that are not None (at least one is)."""
    present = [t for t in terms if t is not None]
    total = present[0]
    for term in present[1:]:
        total = total + term
    return total


def _sum_coefficients(op: TapedOp) -> dict[int, float]:
    """add/sub(a, b, alpha) = a +- alpha b: the coefficient of each operand (position in ``flat``)."""
    return {0: 1, 1: (-1 if op.func is aten.sub.Tensor else 1) * op.argument("alpha")}


def _reduce_like(cotangent: Tensor, arg: Tensor) -> Tensor:
    """``cotangent`` of a broadcast result summed back to ``arg``'s shape, in its dtype."""
    if cotangent.shape != arg.shape:
        cotangent = cotangent.sum_to_size(arg.shape)
    return cotangent.to(arg.dtype)


# Ops linear in their one tensor argument (the rest are sizes, dims or a zero pad value):
# the tangent is the op applied to the input's tangent.
_STRUCTURAL = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.transpose.int,
               aten.permute.default, aten.expand.default, aten.clone.default, aten.t.default,
               aten.unsqueeze.default, aten.squeeze.dim, aten.alias.default, aten.slice.Tensor,
               aten.select.int, aten.split.Tensor, aten.unbind.int, aten.flatten.using_ints,
               aten.mul.Scalar, aten.div.Scalar}


def _used_ops(ops: list[TapedOp], out: Tensor) -> list[TapedOp]:
    """``ops`` without those none of whose results reaches ``out`` (a branch the function
    computed and dropped: its derivative would be work for nothing)."""
    needed = {id(out)}
    kept = []
    for op in reversed(ops):
        if any(o is not None and id(o) in needed for o in op.outputs):
            needed.update(id(op.arg(i)) for i in op.live)
            kept.append(op)
    return kept[::-1]


class OpTape:
    """The tape of ``fn`` at ``x`` (module doc). ``out``: fn(x), detached."""

    def __init__(self, fn, x: Tensor):
        # Recorded with gradients on, as any differentiating caller would run it: modules with
        # fused no-grad fast paths (nn.MultiheadAttention's ``_native_multi_head_attention``, which
        # has no derivative) take their differentiable path. The autograd graph is dropped after.
        x = x.detach().requires_grad_()
        recorder = _Recorder(x)
        with torch.enable_grad(), recorder:
            out = fn(x)
        if not isinstance(out, Tensor):
            raise UnsupportedTape(f"the function returned {type(out).__name__}, not one tensor")
        if recorder.mutating is not None:
            raise UnsupportedTape(f"the function writes in place into a tensor reached from its "
                                  f"input ({recorder.mutating})")
        detached: dict[int, Tensor] = {}

        def plain(t):
            if not isinstance(t, Tensor):
                return t
            if id(t) not in detached:
                detached[id(t)] = t.detach()
            return detached[id(t)]

        self.x, self.out = plain(x), plain(out)
        self.ops = _used_ops([op.with_tensors(plain) for op in recorder.ops], self.out)
        del recorder, detached, x, out
        # How many later ops read each tensor: GroupNorm's rule assumes nothing reads its mean
        # and rstd outputs; a tangent is dropped once its last reader has run.
        self._readers: dict[int, int] = {}
        for op in self.ops:
            for i in op.live:
                self._readers[id(op.arg(i))] = self._readers.get(id(op.arg(i)), 0) + 1
        self._readers[id(self.out)] = self._readers.get(id(self.out), 0) + 1

    # ----- J v ---------------------------------------------------------------------------------
    def jvp(self, v: Tensor) -> Tensor:
        """J v: v shaped like x -> shaped like ``out``."""
        tangents = {id(self.x): v}
        remaining = dict(self._readers)
        with torch.no_grad():
            for op in self.ops:
                inputs = {i: tangents[id(op.arg(i))] for i in op.live}
                for o, t in zip(op.outputs, self._op_jvp(op, inputs), strict=True):
                    if o is not None and t is not None and remaining.get(id(o)):
                        tangents[id(o)] = t
                for i in op.live:
                    key = id(op.arg(i))
                    remaining[key] -= 1
                    if remaining[key] == 0 and key != id(self.out):
                        tangents.pop(key, None)
        if id(self.out) not in tangents:  # out does not depend on x
            return torch.zeros_like(self.out)
        return tangents[id(self.out)]

    def _op_jvp(self, op: TapedOp, tangents: dict[int, Tensor]) -> list:
        """The tangents of ``op``'s outputs (a list aligned with ``op.outputs``)."""
        func, live = op.func, op.live
        if func is aten.convolution.default and live == [0]:
            return [func(tangents[0], op.args[1], None, *op.args[3:])]
        if func is aten.native_group_norm.default and live == [0] and self._extras_unread(op):
            x, weight, _, n, c, hw, group, _ = op.args
            mean, rstd = op.outputs[1], op.outputs[2]
            t = aten.native_group_norm_backward(*_same_layout(tangents[0], x), mean, rstd, None, n, c, hw, group,
                                                [True, False, False])[0]
            return [t if weight is None else t * _channel_view(weight, t), None, None]
        diagonal = _diagonal_product(op, tangents[0]) if live == [0] and self._extras_unread(op) else None
        if diagonal is not None:
            return [diagonal] + [None] * (len(op.outputs) - 1)
        if func in (aten.mm.default, aten.bmm.default):
            a, b = op.args[:2]
            return [_total([func(tangents[0], b) if 0 in tangents else None,
                            func(a, tangents[1]) if 1 in tangents else None])]
        if func is aten.addmm.default and 0 not in tangents:
            _, a, b = op.args[:3]
            alpha = op.argument("alpha")
            total = _total([aten.mm(tangents[1], b) if 1 in tangents else None,
                            aten.mm(a, tangents[2]) if 2 in tangents else None])
            return [total if alpha == 1 else total * alpha]
        if func in (aten.add.Tensor, aten.sub.Tensor):
            return [self._sum_tangent(op, tangents)]
        if func in _STRUCTURAL and live == [0]:
            return tree_flatten(op.call({0: tangents[0]}))[0]
        if func is aten.constant_pad_nd.default and live == [0]:
            return [aten.constant_pad_nd(tangents[0], op.args[1], 0.0)]
        if func in (aten.mul.Tensor, aten.div.Tensor) and live == [0]:
            return [op.call({0: tangents[0]})]
        if func is aten.mul.Tensor and live == [1]:
            return [op.call({1: tangents[1]})]
        return self._generic_jvp(op, tangents)

    def _sum_tangent(self, op: TapedOp, tangents: dict[int, Tensor]) -> Tensor:
        """add/sub(a, b, alpha): t_a +- alpha t_b, broadcast to the output's shape."""
        coefficients, shape = _sum_coefficients(op), op.outputs[0].shape
        return _total([(t if coefficients[i] == 1 else t * coefficients[i]).expand(shape) for i, t in tangents.items()])

    def _generic_jvp(self, op: TapedOp, tangents: dict[int, Tensor]) -> list:
        """PyTorch's forward-mode derivative of ``op`` alone at its recorded inputs; for an op
        without one (``grid_sampler_2d``, for one), the double VJP of that op alone: the VJP of
        its pullback (linear in the cotangent) at 0."""
        fn, primals = op.as_function(), tuple(op.arg(i) for i in op.live)
        directions = tuple(tangents[i] for i in op.live)
        try:
            _, out_tangents = torch.func.jvp(fn, primals, directions)
        except (NotImplementedError, RuntimeError) as error:
            if isinstance(error, torch.OutOfMemoryError):
                raise
            try:
                outputs, pullback = torch.func.vjp(fn, *primals)
                _, pushforward = torch.func.vjp(pullback, tuple(torch.zeros_like(o) for o in outputs))
                out_tangents = pushforward(directions)[0]
            except (NotImplementedError, RuntimeError) as second:
                if isinstance(second, torch.OutOfMemoryError):
                    raise
                raise UnsupportedTape(f"{op.func} has neither a forward-mode derivative ({error}) nor a "
                                      f"double backward ({second})") from second
        result = [None] * len(op.outputs)
        for j, t in zip(op.differentiable_outputs(), out_tangents, strict=True):
            result[j] = t
        return result

    # ----- J^T u -------------------------------------------------------------------------------
    def vjp(self, u: Tensor) -> Tensor:
        """J^T u: u shaped like ``out`` -> shaped like x."""
        cotangents = {id(self.out): u}
        with torch.no_grad():
            for op in reversed(self.ops):
                grads = [None if o is None else cotangents.pop(id(o), None) for o in op.outputs]
                if all(g is None for g in grads):
                    continue
                for i, g in zip(op.live, self._op_vjp(op, grads), strict=True):
                    key = id(op.arg(i))
                    cotangents[key] = g if key not in cotangents else cotangents[key] + g
        if id(self.x) not in cotangents:
            return torch.zeros_like(self.x)
        return cotangents[id(self.x)]

    def _op_vjp(self, op: TapedOp, grads: list) -> list:
        """The cotangents of ``op``'s live inputs (aligned with ``op.live``) from its outputs'."""
        func, live = op.func, op.live
        if func is aten.convolution.default and live == [0]:
            x, weight, _, *geometry = op.args
            return [aten.convolution_backward(grads[0], x, weight, None, *geometry, [True, False, False])[0]]
        if func is aten.native_group_norm.default and live == [0] and self._extras_unread(op):
            x, weight, _, n, c, hw, group, _ = op.args
            return [aten.native_group_norm_backward(*_same_layout(grads[0], x), op.outputs[1], op.outputs[2], weight,
                                                    n, c, hw, group, [True, False, False])[0]]
        diagonal = _diagonal_product(op, grads[0]) if grads[0] is not None and self._extras_unread(op) else None
        if diagonal is not None:
            return [diagonal]
        if func in (aten.mm.default, aten.bmm.default):
            a, b = op.args[:2]
            return [grads[0] @ b.transpose(-2, -1) if i == 0 else a.transpose(-2, -1) @ grads[0] for i in live]
        if func is aten.addmm.default:
            _, a, b = op.args[:3]
            alpha, beta = op.argument("alpha"), op.argument("beta")
            rules = {0: lambda: _reduce_like(grads[0] * beta, op.arg(0)),
                     1: lambda: aten.mm(grads[0], b.t()) * alpha, 2: lambda: aten.mm(a.t(), grads[0]) * alpha}
            return [rules[i]() for i in live]
        if func in (aten.mul.Scalar, aten.div.Scalar):
            return [op.call({0: grads[0]})]
        # Sums, products with a constant and zero padding: their adjoints directly (the generic
        # rule would also recompute the op's output, one more pass over an activation).
        if func in (aten.add.Tensor, aten.sub.Tensor):
            coefficients = _sum_coefficients(op)
            return [_reduce_like(grads[0] if coefficients[i] == 1 else grads[0] * coefficients[i], op.arg(i))
                    for i in live]
        if func is aten.mul.Tensor and len(live) == 1:
            return [_reduce_like(grads[0] * op.arg(1 - live[0]), op.arg(live[0]))]
        if func is aten.div.Tensor and live == [0]:
            return [_reduce_like(grads[0] / op.arg(1), op.arg(0))]
        if func is aten.constant_pad_nd.default and live == [0]:
            return [aten.constant_pad_nd(grads[0], [-p for p in op.args[1]], 0.0)]  # crops what was padded
        return self._generic_vjp(op, grads)

    def _generic_vjp(self, op: TapedOp, grads: list) -> list:
        """PyTorch's reverse-mode derivative of ``op`` alone at its recorded inputs."""
        try:
            outputs, pullback = torch.func.vjp(op.as_function(), *(op.arg(i) for i in op.live))
            cotangents = tuple(torch.zeros_like(o) if grads[j] is None else grads[j]
                               for j, o in zip(op.differentiable_outputs(), outputs, strict=True))
            return list(pullback(cotangents))
        except (NotImplementedError, RuntimeError) as error:
            if isinstance(error, torch.OutOfMemoryError):
                raise
            raise UnsupportedTape(f"{op.func} has no backward: {error}") from error

    def _extras_unread(self, op: TapedOp) -> bool:
        """Whether no later op reads ``op``'s outputs after the first (GroupNorm's mean and rstd,
        BatchNorm's saved statistics): the hand rules give the first output's derivative only."""
        return all(o is None or id(o) not in self._readers for o in op.outputs[1:])
