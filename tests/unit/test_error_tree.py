"""The error tree drawn in `prefect_llamacpp/exceptions.py` is the real one, holds every error
the project raises on purpose, and every error survives pickling (Prefect stores them)."""

from __future__ import annotations

import ast
import inspect
import pickle
import pkgutil
import re
from pathlib import Path

import prefect_llamacpp
from prefect_llamacpp import exceptions

PACKAGE = Path(prefect_llamacpp.__file__).parent
TREE_LINE = re.compile(r"^    ([│├└─ ]*)(\w+Error)\b")


def drawn_tree() -> dict[str, str | None]:
    """Each error of the docstring's drawing and its parent there."""
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []
    for line in exceptions.__doc__.splitlines():
        match = TREE_LINE.match(line)
        if not match:
            continue
        depth, name = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parents[name] = stack[-1][1] if stack else None
        stack.append((depth, name))
    return parents


def real_tree() -> dict[str, str | None]:
    tree = {}
    for name, cls in vars(exceptions).items():
        if inspect.isclass(cls) and issubclass(cls, exceptions.LlamaCppError):
            bases = [b for b in cls.__bases__ if issubclass(b, exceptions.LlamaCppError)]
            tree[name] = bases[0].__name__ if bases else None
    return tree


def test_the_drawing_is_the_hierarchy():
    assert drawn_tree() == real_tree()


def test_no_error_class_lives_outside_the_tree():
    """No module of the package defines an exception of its own."""
    for module in pkgutil.walk_packages([str(PACKAGE)], "prefect_llamacpp."):
        path = PACKAGE.joinpath(*module.name.split(".")[1:])
        source = (
            path.with_suffix(".py") if path.with_suffix(".py").exists() else path / "__init__.py"
        )
        if module.name == "prefect_llamacpp.exceptions":
            continue
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(base) for base in node.bases}
                assert not any(b.endswith(("Error", "Exception")) for b in bases), (
                    f"{module.name}.{node.name} derives from {bases}: define it in exceptions.py"
                )


def test_configuration_errors_are_value_errors_and_never_transient():
    assert issubclass(exceptions.ConfigurationError, ValueError)
    assert not exceptions.ConfigurationError("x").transient


def test_transport_errors_sent_and_not_sent_are_siblings():
    for sent in (exceptions.ServerTimeoutError, exceptions.ServerDisconnectedError):
        assert not issubclass(sent, exceptions.ServerUnreachableError)
        assert issubclass(sent, exceptions.TransportError)


def test_every_error_pickles_with_its_fields():
    samples = [
        exceptions.ServerHTTPError(
            "boom", status_code=503, url="http://x/v1/models", server_message="m", retry_after=2
        ),
        exceptions.UnauthorizedError("no", status_code=401, url="http://x/health"),
        exceptions.ServerNotReadyError("loading", last_state="loading", transient=False),
        exceptions.DeadlineExceededError("late", deadline="first_byte", limit_s=1.5),
        exceptions.NoServerError("none", whole_fleet=True, unserved=True),
        exceptions.AnswerError("validation", "bad"),
        exceptions.ModelError("m", model_name="tiny", transient=True),
        exceptions.LedgerSettingsError("diff", differences={"max_tokens": (1, 2)}),
        exceptions.ConfigurationError("bad url"),
    ]
    for error in samples:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error)
        assert str(copy) == str(error)
        assert vars(copy) == vars(error)
