"""This Prefect project's tasks: `prefect_llamacpp.tasks`, re-exported (see `tasks/llamacpp.py`)."""
