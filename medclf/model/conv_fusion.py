"""A convolution and the ReLU / ReLU6 right after it, run as one oneDNN kernel on a CPU, for inference
only. An activation after a convolution is a memory pass over the whole feature map: with BatchNorm
folded (medclf.model.fold) and bfloat16, EfficientNet-Lite0's ReLU6 took a third of the scoring actor's
time. oneDNN applies it as the convolution writes its output (the op torch.compile's CPU backend
uses), with the same result (bit for bit in every check here; tests/model/test_conv_fusion.py). On
other devices, with gradients on, and while exporting to ONNX, the fused module runs the two steps.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import fx, nn

from medclf.model.fold import module_calls, replace_submodule

# activation -> (oneDNN post-op, its scalars)
_FUNCTIONS = {F.relu6: ("hardtanh", [0.0, 6.0]), F.relu: ("relu", []), torch.relu: ("relu", [])}
_MODULES = {nn.ReLU6: ("hardtanh", [0.0, 6.0]), nn.ReLU: ("relu", [])}


@functools.cache
def fused_op_available() -> bool:
    """Whether this torch build has oneDNN's fused convolution (a private op: checked, never assumed)."""
    try:
        x = torch.ones(1, 1, 3, 3)
        w = torch.ones(1, 1, 1, 1)
        out = torch.ops.mkldnn._convolution_pointwise(x, w, None, [0, 0], [1, 1], [1, 1], 1, "hardtanh", [0.0, 6.0], "")
        return bool(torch.equal(out, x))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


class ConvActivation(nn.Module):
    """`conv` followed by `attr` (relu, or hardtanh 0..6 for ReLU6) in one oneDNN call on a CPU."""

    def __init__(self, conv: nn.Conv2d, attr: str, scalars: list):
        super().__init__()
        self.conv, self.attr, self.scalars = conv, attr, list(scalars)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        # the op has no backward: with gradients on (Grad-CAM on the endpoint's network) the two steps run
        if x.device.type != "cpu" or torch.is_grad_enabled() or torch.onnx.is_in_onnx_export():
            out = c(x)
            return F.relu(out) if self.attr == "relu" else F.hardtanh(out, *self.scalars)
        # autocast does not know this op: cast as it casts a convolution (bfloat16 under score.precision)
        if torch.is_autocast_enabled("cpu"):
            x = x.to(torch.get_autocast_dtype("cpu"))
        weight = c.weight.to(x.dtype)
        bias = c.bias.to(x.dtype) if c.bias is not None else None
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, list(c.padding), list(c.stride),
                                                       list(c.dilation), c.groups, self.attr, self.scalars, "")


def fuse_conv_activation(module: nn.Module) -> int:
    """Fuse every plain Conv2d whose output feeds only a ReLU or ReLU6 (through Identity modules, which is
    what a folded BatchNorm became) in the forward of a submodule of `module`. Each submodule is traced
    one level deep (its own children stay calls, so a hook on any of them still fires), deepest first,
    and becomes an fx GraphModule with the same names where something fused. `module` itself keeps its
    type (MirrorMean, an ensemble). Returns the number of pairs fused; 0 where the op is missing."""
    if not fused_op_available():
        return 0
    return _fuse_children(module.eval())


class _OneLevel(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _fuse_children(module: nn.Module) -> int:
    count = 0
    for name, child in list(module.named_children()):
        if not any(True for _ in child.children()):
            continue  # a leaf: nothing inside it to fuse
        count += _fuse_children(child)
        try:
            graph = _OneLevel().trace(child)
        except Exception:  # noqa: BLE001 - not traceable (a ModuleList, dynamic control flow): children done
            continue
        traced = fx.GraphModule(child, graph, class_name=type(child).__name__)
        fused = _fuse_graph(traced)
        if fused:
            setattr(module, name, traced)
            count += fused
    return count


def _activation(gm: fx.GraphModule, node: fx.Node):
    if node.op == "call_function" and node.target in _FUNCTIONS and not node.kwargs.get("inplace", False) \
            and len(node.args) == 1:
        return _FUNCTIONS[node.target]
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        for kind, post_op in _MODULES.items():
            if type(module) is kind:
                return post_op
    return None


def _fuse_graph(gm: fx.GraphModule) -> int:
    calls = module_calls(gm.graph)
    fused = 0
    for node in list(gm.graph.nodes):
        post_op = _activation(gm, node)
        if post_op is None or not isinstance(node.args[0], fx.Node):
            continue
        source = node.args[0]
        while source.op == "call_module" and type(gm.get_submodule(source.target)) is nn.Identity \
                and len(source.users) == 1 and isinstance(source.args[0], fx.Node):
            source = source.args[0]
        if source.op != "call_module" or len(source.users) != 1 or calls[source.target] != 1:
            continue
        conv = gm.get_submodule(source.target)
        if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            continue
        replace_submodule(gm, source.target, ConvActivation(conv, *post_op))
        node.replace_all_uses_with(node.args[0])  # the activation now happens inside the convolution
        gm.graph.erase_node(node)
        fused += 1
    if fused:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return fused

