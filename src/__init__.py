"""The seed's import paths (`src.core.models`, `src.core.utils`, `src.infrastructure.llm`), kept
for code written against them: each module here is `prefect_llamacpp`'s own (see docs/layout.md). Nothing is implemented here."""
