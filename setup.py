"""Build of the compiled core.

The Cython sources live in ``_core/`` (the design card's layout), each module at its qualified
path with its declarations beside it: ``_core/agent/core/_deadline_queue.pyx`` and
``_deadline_queue.pxd``, and so on. That is where Cython looks for a module's ``.pxd`` when another
module cimports it (``from agent.core._deadline_queue cimport DeadlineQueue``, found through
``include_path=["_core"]``). The modules are compiled into the ``agent.core`` package, so callers
always import them through ``agent`` and never a bare top-level module. ``agent/core/__init__.py``
picks the compiled modules or their pure-Python twin (``agent/core/pure/``).
"""
from setuptools import Extension, setup
from Cython.Build import cythonize

CORE_MODULES = ["deadline_queue", "latency_table", "batch_rules", "batch_assembly", "policy_net", "policy_features", "policy_decide"]

extensions = [
    Extension(
        f"agent.core._{name}",
        sources=[f"_core/agent/core/_{name}.pyx"],
        # -ffp-contract=off: no fused multiply-add, so the latency table and the batching
        # rules compute bit-identical doubles to the pure-Python twin on every board (GCC
        # contracts a*b+c by default where the CPU has FMA, e.g. aarch64 Jetsons).
        extra_compile_args=["-O3", "-ffp-contract=off"],
    )
    for name in CORE_MODULES
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["_core"],
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    ),
)
