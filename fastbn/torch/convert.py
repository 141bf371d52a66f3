"""``convert(module)``: PyTorch's batch-norm modules replaced by fastbn's, and, where torch.fx
can trace the model, BN -> ReLU and BN -> add -> ReLU fused into one fastbn operation.

The replacement shares the original Parameter and buffer objects (as
``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does), so an optimizer built before the
conversion keeps training the same tensors and the state_dict keys do not change.
"""
import operator

import torch
import torch.fx
import torch.nn.functional as F

from . import modules
from .sync import SyncBatchNorm

__all__ = ["convert"]

_PLAIN = {torch.nn.BatchNorm1d: modules.BatchNorm1d, torch.nn.BatchNorm2d: modules.BatchNorm2d,
          torch.nn.BatchNorm3d: modules.BatchNorm3d}
_FUSED = {modules.BatchNorm1d: modules.BatchNormAct1d, modules.BatchNorm2d: modules.BatchNormAct2d,
          modules.BatchNorm3d: modules.BatchNormAct3d}
_FASTBN_MODULES = (modules.BatchNorm1d, modules.BatchNorm2d, modules.BatchNorm3d, SyncBatchNorm)


def convert(module, sync=False, fuse=True, process_group=None):
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` in ``module`` by fastbn's.

    Parameters
    ----------
    module : torch.nn.Module
        Converted in place where possible; use the returned module.
    sync : bool
        True: replace them (and any ``torch.nn.SyncBatchNorm``) by
        :class:`fastbn.torch.SyncBatchNorm` over ``process_group`` instead.
    fuse : bool
        True: where ``torch.fx.symbolic_trace`` traces a module, fuse BN -> ReLU/Sigmoid and
        BN -> add -> ReLU/Sigmoid into :class:`BatchNormAct2d` (etc.). A module that fuses is
        returned as a ``torch.fx.GraphModule`` (same submodules, parameters and state_dict
        keys, but not the original class); one that does not trace keeps its class, with its
        children tried one by one. Synchronized BN is never fused.
    process_group : optional
        For ``sync=True``: the group the statistics are synchronized over (default: world).

    Returns
    -------
    torch.nn.Module

    See Also
    --------
    torch.nn.SyncBatchNorm.convert_sync_batchnorm
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    module = _replace(module, sync, process_group)
    if fuse and not sync:
        module = _fuse(module)
    return module


# ----------------------------------------------------------------------------------------------
# plain replacement

def _replacement_class(module, sync):
    kind = type(module)
    if sync:
        return SyncBatchNorm if kind in _PLAIN or kind is torch.nn.SyncBatchNorm else None
    return _PLAIN.get(kind)  # exact types: a user's subclass may have its own forward


def _copy_state(source, target):
    """Share source's parameters and buffers with target (same objects, like
    convert_sync_batchnorm), and its mode."""
    with torch.no_grad():
        for name in ("weight", "bias"):
            setattr(target, name, getattr(source, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            target.register_buffer(name, getattr(source, name))
    target.train(source.training)
    if hasattr(source, "qconfig"):
        target.qconfig = source.qconfig
    return target


def _new_like(source, cls, **extra):
    has_bias = source.bias is not None or not source.affine
    target = cls(source.num_features, source.eps, source.momentum, source.affine,
                 source.track_running_stats, bias=has_bias, **extra)
    return _copy_state(source, target)


def _replace(module, sync, process_group):
    cls = _replacement_class(module, sync)
    if cls is not None:
        extra = {"process_group": process_group} if sync else {}
        return _new_like(module, cls, **extra)
    for name, child in module.named_children():
        converted = _replace(child, sync, process_group)
        if converted is not child:
            module.add_module(name, converted)
    return module


# ----------------------------------------------------------------------------------------------
# fusion with torch.fx

class _Tracer(torch.fx.Tracer):
    """Keeps fastbn's modules as single call_module nodes (fx would trace into them)."""

    def is_leaf_module(self, module, qualified_name):
        return isinstance(module, _FASTBN_MODULES) or super().is_leaf_module(module,
                                                                             qualified_name)


def _contains_fusable_bn(module):
    return any(type(m) in _FUSED for m in module.modules())


def _fuse(module):
    """The module with its BN -> (add ->) activation chains fused: the traced GraphModule when
    it traces and fuses, else the module itself with each child tried in turn."""
    if isinstance(module, _FASTBN_MODULES) or not _contains_fusable_bn(module):
        return module
    fused = _try_fuse(module)
    if fused is not None:
        return fused
    for name, child in module.named_children():
        converted = _fuse(child)
        if converted is not child:
            module.add_module(name, converted)
    return module


def _try_fuse(module):
    try:
        graph = _Tracer().trace(module)
    except Exception:
        return None  # not traceable (data-dependent control flow, ...): keep the module
    graph_module = torch.fx.GraphModule(module, graph, module.__class__.__name__)
    if sorted(graph_module.state_dict()) != sorted(module.state_dict()):
        return None  # the trace dropped a parameter or buffer (an unused submodule)
    if _fuse_graph(graph_module) == 0:
        return None
    graph_module.training = module.training  # not .train(): submodules keep their own modes
    return graph_module


def _activation_of(graph_module, node):
    """"relu"/"sigmoid" if node applies one of them to a single tensor, else None."""
    if node.op == "call_module":
        target = graph_module.get_submodule(node.target)
        kind = {torch.nn.ReLU: "relu", torch.nn.Sigmoid: "sigmoid"}.get(type(target))
    elif node.op == "call_function":
        kind = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu",
                torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid"}.get(node.target)
    elif node.op == "call_method":
        kind = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid",
                "sigmoid_": "sigmoid"}.get(node.target)
    else:
        kind = None
    extra_kwargs = set(node.kwargs) - {"inplace"}
    return kind if kind is not None and len(node.args) == 1 and not extra_kwargs else None


_ADDS = {("call_function", operator.add), ("call_function", operator.iadd),
         ("call_function", torch.add), ("call_method", "add"), ("call_method", "add_")}
_IN_PLACE_ADDS = {operator.iadd, "add_"}


def _residual_of(node, bn_node):
    """The other operand if node is ``bn_node + residual`` with a tensor residual, else None."""
    if (node.op, node.target) not in _ADDS or node.kwargs or len(node.args) != 2:
        return None
    first, second = node.args
    if first is bn_node and isinstance(second, torch.fx.Node) and second is not bn_node:
        return second
    if second is bn_node and isinstance(first, torch.fx.Node) and first is not bn_node \
            and node.target not in _IN_PLACE_ADDS:  # residual += bn(x) mutates the residual
        return first
    return None


def _only_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _fuse_graph(graph_module):
    """Rewrite BN -> act and BN -> add -> act chains in place; returns how many it fused."""
    graph = graph_module.graph
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    fused = 0
    for bn_node in list(graph.nodes):
        if bn_node.op != "call_module" or calls[bn_node.target] != 1:
            continue  # a module called twice would change at its other call site
        bn = graph_module.get_submodule(bn_node.target)
        if type(bn) not in _FUSED or len(bn_node.args) != 1 or bn_node.kwargs:
            continue
        user = _only_user(bn_node)
        if user is None:
            continue
        residual, add_node, act_node = _residual_of(user, bn_node), None, user
        if residual is not None:
            add_node, act_node = user, _only_user(user)
            if act_node is None:
                continue
        activation = _activation_of(graph_module, act_node)
        if activation is None:
            continue
        fused_bn = _new_like(bn, _FUSED[type(bn)], activation=activation)
        _set_submodule(graph_module, bn_node.target, fused_bn)
        with graph.inserting_after(act_node):
            args = (bn_node.args[0],) if residual is None else (bn_node.args[0], residual)
            fused_node = graph.call_module(bn_node.target, args)
        act_node.replace_all_uses_with(fused_node)
        for dead in (act_node, add_node, bn_node):
            if dead is not None:
                graph.erase_node(dead)
        fused += 1
    if fused:
        graph.lint()
        graph_module.delete_all_unused_submodules()
        graph_module.recompile()
    return fused


def _set_submodule(root, qualified_name, module):
    parent_name, _, name = qualified_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, name, module)
