"""kt-functional: the routed experts of huge MoE models, forward and backward with LoRA, on the CPU.

    import kt_functional as ktf
    weights = ktf.ExpertWeights.from_tensors(gate, up, down)
    state = ktf.MoEState(weights, ktf.LoRA.init(weights, rank=16), threads=2)
    y, cache = ktf.moe_forward(state, x, ids, w)
    grads = ktf.moe_backward(state, cache, gy)
"""
from . import _core
from .ops import ForwardHandle, Grads, LoRAGrads, MoECache, moe_backward, moe_forward, moe_forward_async
from .state import ExpertVariant, ExpertWeights, LoRA, MoEState, numa_nodes

# Fails here, with a message naming KT_ISA, when KT_ISA asks for a path this CPU cannot run.
_DEFAULT_ISA = _core.default_isa()


def available_isas() -> list[str]:
    """ISA paths this CPU and build can run, best first (a subset of amx, avx512, avx2)."""
    return _core.runnable_isas()


def release_workspaces() -> int:
    """Returns the kernels' cached per-call workspaces to the OS (they are kept for reuse, at most
    the peak workspace in use at once, or KT_WORKSPACE_CACHE_MB MiB); returns the bytes released."""
    return _core.release_workspaces()


def cpu_info() -> dict:
    """CPU features found at run time, whether Linux granted AMX, and the ISA path in use."""
    info = _core.cpu_features()
    info["isa"] = _DEFAULT_ISA
    info["available_isas"] = available_isas()
    return info


__all__ = [
    "ExpertVariant", "ExpertWeights", "LoRA", "MoEState", "MoECache", "Grads", "LoRAGrads", "ForwardHandle",
    "moe_forward", "moe_forward_async", "moe_backward", "cpu_info", "numa_nodes", "available_isas",
    "release_workspaces",
]
__version__ = "0.1.0"
