"""The seed's `src.core.batch`: the batch machinery lives in `prefect_llamacpp.batch`."""
