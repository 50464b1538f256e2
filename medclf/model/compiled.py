"""`score.compile`: the answering network under torch.compile, for long runs on GPU nodes.

torch.compile wants one graph with no Python side effects, but the answering paths read the
penultimate features (the out-of-scope guard's and drift's input) through a hook on the head
(medclf.model.networks.penultimate), registered and removed on every call. So the network is first
traced whole with torch.fx into a module that returns both outputs itself, (logits, features), the
features by the same rule as `penultimate` (networks.head_features); that module is compiled. The compiled copy only answers: it
is never trained, adapted or saved.

Measured on the 2-core CPU machine (Lite0, float32, batch 64, benchmarks/compile_forward.py): the
compiled forward ran 0.90x (95% CI 0.86-0.94) the eager folded + fused network's 198 images/s, after
11 s of compiling (3.6 s with Inductor's on-disk cache warm) and 8 s more (2.8) for a second batch
shape. So it is an opt-in for GPU nodes, off by default; benchmarks/gpu_check.sh measures it there.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from medclf.errors import ModelError
from medclf.model.ensemble import ENSEMBLE_ARCH
from medclf.model.networks import MirrorMean, head_features, head_module, plain_model


class CompileError(ModelError):
    """The network cannot be traced whole (an ensemble, dynamic control flow)."""


def check_compilable(arch: str) -> None:
    """Refuse, before any work, an artifact whose network cannot be compiled whole (its card's arch)."""
    if arch == ENSEMBLE_ARCH:
        raise CompileError("score.compile: an ensemble artifact cannot be compiled whole; score it without compile")


def logits_and_features_module(model: nn.Module, arch: str) -> fx.GraphModule:
    """`model` traced whole, returning (logits, features) as `penultimate(model, arch, x)` does: the
    features are the head's input flattened, and under MirrorMean those of the images as given."""
    check_compilable(ENSEMBLE_ARCH if getattr(model, "is_ensemble", False) else arch)
    head = head_module(plain_model(model), arch)
    try:
        gm = fx.GraphModule(model, _HeadAsLeaf(head).trace(model))
    except Exception as exc:  # noqa: BLE001 - say which network, not the tracer's internals
        raise CompileError(f"score.compile: {arch} cannot be traced whole by torch.fx ({type(exc).__name__})") from None
    names = [name for name, module in gm.named_modules() if module is head]
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in names]
    if len(calls) != 1:
        raise CompileError(f"score.compile: {arch}'s head is called {len(calls)} times in the traced network")
    graph = gm.graph
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(output):
        features = graph.call_function(head_features, (calls[0].args[0], isinstance(model, MirrorMean)))
    output.args = ((output.args[0], features),)
    graph.lint()
    gm.recompile()
    return gm


class _HeadAsLeaf(fx.Tracer):
    """Traces everything but the head (a Sequential classifier too), which stays one call: its input is
    the features."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is self.head or super().is_leaf_module(m, module_qualified_name)


def compiled_network(model: nn.Module, arch: str):
    """The compiled (logits, features) module of `model` (compiled lazily, at its first call)."""
    return torch.compile(logits_and_features_module(model, arch))
