"""The layer's code path is the same for local and expert-parallel dispatch.

Statically: the methods a forward runs never ask what kind of part they hold (no isinstance / getattr / hasattr /
type on ``self``'s parts), touch the dispatcher only through ``plan`` / ``dispatch`` / ``combine``, read only the
plan's bank and accounting fields, and pass the handle on unread. Behaviourally: a recording wrapper sees the same
calls, with the same plan and handle objects, and an unchanged plan, for every local dispatcher here and for the
expert-parallel one in the 2-rank worker (tests/_parallel_workers.py::check_same_layer_path)."""

import ast
import inspect
import textwrap

import pytest
import torch

import moekit.layer
from moekit import Capacity, Dropless, MoE, SwiGLU, TopK
from moekit.routers import MoEPP, TopP

from _dispatch_probe import EXPECTED_LOG, RecordingDispatcher

FORWARD_METHODS = ("forward", "forward_with_aux", "_tokens", "_context", "_shared", "_counted", "_stats", "_record")
PLAN_FIELDS_THE_LAYER_READS = {"counts_E", "expert_N", "routed_E", "kept_E"}


def _tree(fn) -> ast.AST:
    return ast.parse(textwrap.dedent(inspect.getsource(fn)))


def _mentions_self(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Name) and n.id == "self" for n in ast.walk(node))


def _is_call(node: ast.AST, names: tuple[str, ...]) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names


def test_forward_never_branches_on_part_types():
    """(``type(self.router).__name__`` in an error message is allowed; comparing a part's type is not.)"""
    for name in FORWARD_METHODS:
        for node in ast.walk(_tree(getattr(MoE, name))):
            if _is_call(node, ("isinstance", "issubclass", "getattr", "hasattr")):
                assert not any(_mentions_self(arg) for arg in node.args), (name, ast.unparse(node))
            if isinstance(node, ast.Compare):
                for side in (node.left, *node.comparators):
                    assert not (_is_call(side, ("type",)) and _mentions_self(side)), (name, ast.unparse(node))


def test_forward_uses_only_the_dispatcher_contract():
    dispatcher_attrs, plan_attrs, handle_uses = set(), set(), []
    for name in FORWARD_METHODS:
        tree = _tree(getattr(MoE, name))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                v = node.value
                if isinstance(v, ast.Attribute) and v.attr == "dispatcher":
                    dispatcher_attrs.add(node.attr)
                if isinstance(v, ast.Name) and v.id == "plan":
                    plan_attrs.add(node.attr)
                if isinstance(v, ast.Name) and v.id == "handle":
                    handle_uses.append(ast.unparse(node))
    assert dispatcher_attrs == {"plan", "dispatch", "combine"}
    assert plan_attrs <= PLAN_FIELDS_THE_LAYER_READS, plan_attrs - PLAN_FIELDS_THE_LAYER_READS
    assert not handle_uses, handle_uses  # the handle is opaque: passed from dispatch to combine, never read
    # and the layer module knows no dispatcher class by name
    src = inspect.getsource(moekit.layer)
    for word in ("AllToAll", "LocalDispatcher", "CapacityDispatcher", "exchange", "parallel"):
        assert word not in src, word


@pytest.mark.parametrize("router,dispatch", [
    (TopK(k=2), Dropless()),
    (TopK(k=2), Capacity(factor=0.5)),
    (TopP(), Dropless()),  # pairs without a top-k grid
    (MoEPP(k=2, router_hidden_mult=None), Capacity(factor=1.0, per_sequence=True)),  # compute-free experts
])
def test_layer_drives_any_dispatcher_the_same_way(router, dispatch):
    torch.manual_seed(0)
    layer = MoE(8, 4, router=router, experts=SwiGLU(hidden_dim=6), dispatch=dispatch)
    x = torch.randn(2, 5, 8, requires_grad=True)
    want = layer(x)
    layer.dispatcher = RecordingDispatcher(layer.dispatcher)
    got = layer(x)
    got.sum().backward()
    assert layer.dispatcher.log == EXPECTED_LOG
    assert torch.equal(got, want)
