"""How a llama.cpp chat request is built, and how its answer is read: one owner for both.

The batch hot path sends these bodies itself (one `json.dumps` and one POST per item) instead of
going through the OpenAI SDK and pydantic-ai's request path, which cost about twice the client CPU
on short answers. The body is what pydantic-ai sends for the same request with `LlamaCppProvider`:
the provider's profile decides how a `json_schema` is transformed and that it is repeated in the
instructions (llama-server compiles it into a grammar either way). Structured answers are
validated against the caller's schema with `jsonschema`.

    request = build_chat_request(messages, model="qwen3", max_tokens=64, output_schema=schema)
    answer = read_chat_answer(await client.chat_completion(request.body))

Embeddings the same way, as pydantic-ai's `OpenAIEmbeddingModel` sends them (the server must run
with `--embeddings`):

    request = build_embedding_request(["first", "second"], model="bge")
    answer = read_embedding_answer(await client.embeddings(request.body), request.count)
"""

from __future__ import annotations

import array
import base64
import binascii
import hashlib
import json
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jsonschema
from pydantic_ai.profiles import DEFAULT_PROMPTED_OUTPUT_TEMPLATE

from prefect_llamacpp import fast_json
from prefect_llamacpp.exceptions import AnswerError, ConfigurationError
from prefect_llamacpp.provider import checked_chat_template_kwargs, llamacpp_model_profile

OUTPUT_NAME = "output"  # the json_schema name pydantic-ai gives native output


@dataclass(frozen=True, slots=True)
class ChatRequest:
    body: bytes
    """The encoded JSON body, ready to POST to `/v1/chat/completions`."""
    output_schema: str | None
    """The caller's schema (canonical JSON) the answer must satisfy, if any."""


@dataclass(frozen=True, slots=True)
class ChatAnswer:
    text: str
    reasoning: str | None
    finish_reason: str | None
    model: str | None
    prompt_tokens: int
    completion_tokens: int


# Built once: `json.dumps` with options builds an encoder per call (a third of a fingerprint's cost).
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def canonical_json(value: Any) -> str:
    """Key-sorted, compact, ASCII-only JSON: equal values give equal text (and fingerprints).

    ASCII-only, so any string JSON can carry (a lone surrogate too) encodes."""
    return _CANONICAL.encode(value)


def fingerprint(value: Any) -> str:
    """A short, stable hash of a JSON value: equal values, equal fingerprints, on any machine."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:20]


def build_chat_request(
    messages: list[dict[str, str]],
    *,
    model: str,
    system_prompt: str | None = None,
    output_schema: dict[str, Any] | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    extra_body: dict[str, Any] | None = None,
    sampling: dict[str, Any] | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> ChatRequest:
    """The body of a chat completion for llama-server.

    `messages` are OpenAI-style `{"role", "content"}` text messages; `system_prompt` is used
    unless they bring their own system message. `output_schema` (a JSON Schema) asks for a
    grammar-enforced JSON answer. `extra_body` adds llama-server fields (`top_k`, `min_p`,
    `ignore_eos`, ...) and `sampling` the OpenAI fields of one request (`stop`, `seed`, `top_p`,
    ...), which win over `extra_body`; neither can replace the fields above.
    `chat_template_kwargs` are variables for the model's chat template (`{"enable_thinking":
    False}`); they replace any in `extra_body`, and anything but an object raises `ConfigurationError`.
    """
    sent: list[dict[str, str]] = []
    leading_system = 0
    for message in messages:
        role = "system" if message["role"] == "developer" else message["role"]
        if role == "system" and leading_system == len(sent):
            leading_system += 1
        sent.append({"role": role, "content": message["content"]})
    if system_prompt and not any(m["role"] == "system" for m in sent):
        sent.insert(0, {"role": "system", "content": system_prompt})
        leading_system += 1
    body: dict[str, Any] = {**(extra_body or {}), **(sampling or {})}
    body["model"] = model
    body["stream"] = False
    schema_key = None
    if output_schema is not None:
        schema_key = canonical_json(output_schema)
        # The model reads the schema in the caller's key order; the cache key keeps that order.
        instructions, response_format = _schema_parts(model, json.dumps(output_schema))
        sent.insert(leading_system, {"role": "system", "content": instructions})
        body["response_format"] = response_format
    body["messages"] = sent
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if temperature is not None:
        body["temperature"] = temperature
    if chat_template_kwargs is not None:
        body["chat_template_kwargs"] = checked_chat_template_kwargs(chat_template_kwargs)
    return ChatRequest(canonical_json(body).encode(), schema_key)


def read_chat_answer(body: Any) -> ChatAnswer:
    """The text, reasoning, finish reason, model and token counts of a chat completion.

    Raises `AnswerError("invalid_response", ...)` when `body` is not a chat completion.
    """
    try:
        choice = body["choices"][0]
        message = choice["message"]
        text = message.get("content") or ""
        usage = body.get("usage") or {}
        answer = ChatAnswer(
            text=text,
            reasoning=message.get("reasoning_content") or None,
            finish_reason=choice.get("finish_reason"),
            model=body.get("model"),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
        )
    except (KeyError, IndexError, TypeError, AttributeError, ValueError, OverflowError) as exc:
        raise AnswerError(
            "invalid_response", f"the answer is not a chat completion ({type(exc).__name__})"
        ) from exc
    if not isinstance(text, str):
        raise AnswerError("invalid_response", "the answer's content is not text")
    return answer


def structured_output(answer: ChatAnswer, schema_key: str) -> Any:
    """The answer as a JSON value that satisfies the schema; `AnswerError("validation")` if not.

    Parsed from the answer text only, never from the reasoning.
    """
    try:
        value = json.loads(answer.text)
    except (ValueError, RecursionError):
        why = "cut off at max_tokens" if answer.finish_reason == "length" else "not valid JSON"
        raise AnswerError("validation", f"the answer is {why}: {answer.text[:200]!r}") from None
    try:
        errors = sorted(_validator(schema_key).iter_errors(value), key=lambda e: list(e.path))
    except Exception as exc:  # a hostile schema ($ref to nowhere, a $ref loop)
        raise AnswerError(
            "validation",
            f"the answer could not be checked against the schema ({type(exc).__name__})",
        ) from exc
    if errors:
        where = "/".join(str(p) for p in errors[0].path) or "(root)"
        raise AnswerError(
            "validation", f"output does not match the schema at {where}: {errors[0].message}"
        )
    return value


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    body: bytes
    """The encoded JSON body, ready to POST to `/v1/embeddings`."""
    count: int
    """How many inputs it carries: the answer must hold as many vectors."""


@dataclass(frozen=True, slots=True)
class EmbeddingAnswer:
    vectors: list[list[float]]
    """One vector per input, in input order, each of the model's `n_embd` floats."""
    model: str | None
    prompt_tokens: int


def build_embedding_request(
    inputs: str | list[str], *, model: str, extra_body: dict[str, Any] | None = None
) -> EmbeddingRequest:
    """The body of a `/v1/embeddings` request: one vector per text in `inputs`.

    It asks for base64 vectors, as the OpenAI SDK under pydantic-ai does: llama-server sends
    float32 bytes, lossless and a third the size of JSON numbers. `extra_body` adds fields (an
    `encoding_format` of its own included); it cannot replace `model` or `input`. Raises
    `ValueError` for no inputs (llama-server answers 400) or an input that is not text.
    """
    texts = [inputs] if isinstance(inputs, str) else list(inputs)
    if not texts:
        raise ConfigurationError("an embedding request needs at least one input text")
    if not all(isinstance(text, str) for text in texts):
        raise ConfigurationError("embedding inputs must be strings")
    body: dict[str, Any] = {"encoding_format": "base64", **(extra_body or {})}
    body["model"] = model
    body["input"] = texts
    return EmbeddingRequest(canonical_json(body).encode(), len(texts))


def read_embedding_answer(body: Any, count: int) -> EmbeddingAnswer:
    """The vectors (in input order), model and prompt tokens of a `/v1/embeddings` answer.

    Vectors may be JSON numbers or base64 float32. Raises `AnswerError("invalid_response", ...)`
    unless `body` is an OpenAI embeddings list with exactly one finite, non-empty vector per
    index 0..count-1, all of one length.
    """
    try:
        vectors: dict[int, list[float]] = {}
        for item in body["data"]:
            index = item["index"]
            if type(index) is not int or index in vectors:
                raise ValueError("bad index")
            vectors[index] = _vector(item["embedding"])
        usage = body.get("usage") or {}
        model = body.get("model")
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
    except (KeyError, IndexError, TypeError, AttributeError, ValueError, OverflowError) as exc:
        raise AnswerError(
            "invalid_response", f"the answer is not an embeddings list ({type(exc).__name__})"
        ) from exc
    if sorted(vectors) != list(range(count)):
        raise AnswerError(
            "invalid_response",
            f"the answer holds vectors for indexes {sorted(vectors)[:10]}, not one for each of "
            f"the {count} inputs",
        )
    ordered = [vectors[index] for index in range(count)]
    if len({len(vector) for vector in ordered}) > 1:
        raise AnswerError("invalid_response", "the answer's vectors differ in length")
    return EmbeddingAnswer(ordered, model if isinstance(model, str) else None, prompt_tokens)


def _vector(value: Any) -> list[float]:
    """A list of JSON numbers or base64 float32 bytes as floats; ValueError if neither."""
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except binascii.Error as exc:
            raise ValueError("not base64") from exc
        if len(raw) % 4:
            raise ValueError("not float32 bytes")
        floats = array.array("f", raw)
        if sys.byteorder == "big":  # llama-server sends little-endian float32
            floats.byteswap()
        vector = floats.tolist()
    elif isinstance(value, list) and all(type(x) in (float, int) for x in value):
        vector = [float(x) for x in value]
    else:
        raise ValueError("not numbers")
    if not vector or not fast_json.finite(vector):
        raise ValueError("empty or not finite")
    return vector


def schema_problem(schema: Any) -> str | None:
    """Why `schema` cannot be used as an output schema, or None when it can."""
    if not isinstance(schema, dict):
        return "the schema must be a JSON object"
    try:
        if _remote_ref(schema):
            return "a schema with a $ref outside itself (only '#...' references are followed)"
        validator_class = jsonschema.validators.validator_for(schema)
        validator_class.check_schema(schema)
        validator = validator_class(schema)
        # Unresolvable or looping $refs only fail when an answer is checked: check some now.
        for sample in ({}, [], "", 0, None):
            for _ in validator.iter_errors(sample):
                pass
    except jsonschema.SchemaError as exc:
        return f"not a valid JSON Schema: {exc.message}"
    except Exception as exc:  # a schema can be hostile in ways check_schema does not expect
        return f"not a usable JSON Schema ({type(exc).__name__})"
    return None


def _remote_ref(node: Any) -> bool:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            return True
        return any(_remote_ref(value) for value in node.values())
    if isinstance(node, list):
        return any(_remote_ref(value) for value in node)
    return False


@lru_cache(maxsize=64)
def _schema_parts(model: str, schema_json: str) -> tuple[str, dict[str, Any]]:
    """The instructions and `response_format` for a schema, as pydantic-ai's native output sends
    them with the llama.cpp profile."""
    profile = llamacpp_model_profile(model)
    schema = json.loads(schema_json)
    transformer = profile.get("json_schema_transformer")
    sent_schema = transformer(schema, strict=None).walk() if transformer else schema
    described = {**sent_schema, "title": OUTPUT_NAME}
    template = profile.get("prompted_output_template") or DEFAULT_PROMPTED_OUTPUT_TEMPLATE
    if "{schema}" not in template:
        template = f"{template}\n\n{{schema}}"
    instructions = template.format(schema=json.dumps(described))
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": OUTPUT_NAME, "schema": sent_schema},
    }
    return instructions, response_format


@lru_cache(maxsize=64)
def _validator(schema_key: str) -> jsonschema.protocols.Validator:
    schema = json.loads(schema_key)
    return jsonschema.validators.validator_for(schema)(schema)
