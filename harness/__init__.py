"""A local llama-server for the tests, the demo and the benchmarks.

`binary` finds or builds `llama-server`, `models` writes small random-weight GGUF models,
`server` starts and stops a server process. Nothing here is needed to *use* prefect-llamacpp
against your own server.
"""
