"""The Prefect project this repository deploys (`prefect.yaml`): its entry points are the flows of
`prefect_llamacpp`, re-exported, so `python -m flows.batch` and `flows/health.py:...` work."""
