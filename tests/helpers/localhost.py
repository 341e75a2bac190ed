"""A free TCP port on localhost, for the coordinator of jax.distributed test processes."""

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]
