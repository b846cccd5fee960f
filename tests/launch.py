"""The torchrun launch lines of docs/cluster.md, as the distributed tests run them.

`tests/test_docs_cluster.py` checks that every launch line of the page has one of these shapes, and the tests
of index builds, harvests and training under torchrun launch with them.
"""

from __future__ import annotations

ONE_NODE = ("--standalone", "--nproc-per-node", "{N}")
"""One node, N processes."""
NODES = ("--nnodes", "{M}", "--node-rank", "{R}", "--nproc-per-node", "{N}", "--master-addr", "{HOST}", "--master-port", "{PORT}")
"""Node R of M, N processes each, meeting at HOST:PORT."""


def one_node(n: int) -> list[str]:
    return [arg.format(N=n) for arg in ONE_NODE]


def node(m: int, r: int, n: int, host: str, port: int) -> list[str]:
    return [arg.format(M=m, R=r, N=n, HOST=host, PORT=port) for arg in NODES]
