"""The face of medvlm: the command line, the command implementations, the model registry, the benchmarks' command
glue and the HTTP server. This is the only package that knows every other one; nothing below imports it
(enforced by the import-linter contracts in ``pyproject.toml``, run by ``make test``)."""
