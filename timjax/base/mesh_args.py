"""Command-line flags for the device mesh (kept free of JAX so ``timjax --help`` stays fast)."""

from __future__ import annotations


def add_mesh_arguments(parser) -> None:
    """``--tp``, ``--dp`` and the multi-host flags for a CLI command."""
    g = parser.add_argument_group("devices", "tensor / data parallel over a device mesh (default: one device)")
    g.add_argument("--tp", type=int, default=1, help="tensor parallel: devices per model replica")
    g.add_argument("--dp", type=int, default=1, help="data parallel: model replicas, requests split among them")
    g.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host: call jax.distributed.initialize (flags below, else JAX_* / cluster env)",
    )
    g.add_argument("--coordinator", default=None, help="multi-host: coordinator address host:port")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)
