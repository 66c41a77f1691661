"""Channel rules, one module per family of ops; importing this package fills the registry."""
from . import graph_io, pointwise, movement, layers, norms, reductions, attention, einsum, shape_queries  # noqa: F401
