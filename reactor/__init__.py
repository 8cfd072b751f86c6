"""reactor: a single-threaded epoll reactor in pure Python, and a load-balancing
TCP gateway for game servers built on it, with live introspection of its sockets."""

__version__ = "0.1.0"
