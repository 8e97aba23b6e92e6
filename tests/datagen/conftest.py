"""The datagen tests' endpoint: a real `mup serve` of a tiny random llama and a counting proxy in
front of it (`_support.endpoints`)."""

from _support.endpoints import proxy, server, tiny_dir  # noqa: F401
