"""jaxkv's parallel layer: a four-axis device mesh and one table of logical-axis rules.

`make_mesh("data=2,model=4")` builds the mesh; `opt_state_shardings` and `cache_shardings` (and the
model's `param_shardings`) give the NamedShardings to place state with and to hand to jit; `constrain`
pins activations inside the model; `initialize` joins a multi-process job.
"""

from jaxkv.parallel.distributed import initialize
from jaxkv.parallel.mesh import AXES, make_mesh, parse_mesh_spec
from jaxkv.parallel.rules import (LOGICAL_RULES, cache_shardings, constrain, logical_spec, logical_to_mesh,
                                  opt_state_shardings, replicated, tree_shardings)

__all__ = ["AXES", "initialize", "make_mesh", "parse_mesh_spec", "LOGICAL_RULES", "cache_shardings",
           "constrain", "logical_spec", "logical_to_mesh", "opt_state_shardings", "replicated", "tree_shardings"]
