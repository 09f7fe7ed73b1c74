"""Random-weight llama GGUF models for the tests, written by the `gguf` package (no download).

The weights are noise, so the text is noise, but every server path is real: tokenizer, chat
template, slots, continuous batching, and grammar-constrained JSON output. Models are written
once, deterministically, into the per-user cache (keyed by their spec) and reused.

    python -m harness.models bench   # print the path, writing the model first if needed
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# ChatML-style; accepts a plain string content (what llama-server hands the template).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# ChatML that also renders tools, tool calls and tool results (Hermes-style <tool_call> tags),
# and a reasoning section that `enable_thinking` switches: what a current tool-calling,
# reasoning model's template does, written for the tests. llama-server's template analysis
# finds the tool-call and reasoning markers in it.
TOOLS_THINKING_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}
{% endif %}You may call functions. Their signatures are in <tools></tools>:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
For each call write <tool_call>{"name": <name>, "arguments": <object>}</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant
{% if message.content %}{{ message.content }}{% endif %}
{%- if message.tool_calls %}{% for call in message.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>{% endfor %}{% endif %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% else %}<think>
{% endif %}{% endif %}"""
TEMPLATES = {"chatml": CHAT_TEMPLATE, "tools-thinking": TOOLS_THINKING_TEMPLATE}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_vocab: int  # word pieces on top of the 256 byte tokens and the specials
    n_ctx_train: int = 4096
    f16: bool = True
    seed: int = 0
    template: str = "chatml"  # a key of TEMPLATES

    def digest(self) -> str:
        fields = asdict(self)
        if self.template == "chatml":  # the first models' digests, so their caches stay valid
            del fields["template"]
        else:
            fields["template"] = TEMPLATES[self.template]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


SPECS = {
    # ~0.6 MB, loads instantly: most tests.
    "tiny": ModelSpec("tiny", n_embd=64, n_layer=2, n_ff=128, n_head=4, n_vocab=256, f16=False),
    # The same, with a template that renders tool calls and switches thinking (agent profiles).
    "tiny-tools": ModelSpec(
        "tiny-tools",
        n_embd=64,
        n_layer=2,
        n_ff=128,
        n_head=4,
        n_vocab=256,
        f16=False,
        template="tools-thinking",
    ),
    # ~290 MB: tokens cost what a small real model's do on this CPU (benchmarks).
    "bench": ModelSpec("bench", n_embd=1024, n_layer=8, n_ff=2816, n_head=16, n_vocab=32000),
    # ~1.1 GB: loading (with --no-mmap) takes long enough to watch the 503 "Loading model" state.
    "slow-load": ModelSpec(
        "slow-load", n_embd=2048, n_layer=10, n_ff=5632, n_head=16, n_vocab=32000
    ),
}


def models_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "prefect-llamacpp" / "models"


def ensure_model(name: str, directory: Path | None = None) -> Path:
    """The path of model `name` (`tiny`, `bench`, `slow-load`), written first if missing."""
    spec = SPECS[name]
    directory = directory or models_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{spec.name}-{spec.digest()}.gguf"
    if not path.is_file():
        staged = path.with_suffix(f".{os.getpid()}.partial")
        write_model(spec, staged)
        os.replace(staged, path)  # a half-written model never looks finished
    return path


def write_model(spec: ModelSpec, path: Path, alias: str | None = None) -> None:
    import gguf

    rng = np.random.default_rng(spec.seed)
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name(alias or f"random-{spec.name}")
    writer.add_context_length(spec.n_ctx_train)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head)
    writer.add_rope_dimension_count(spec.n_embd // spec.n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if spec.f16 else gguf.LlamaFileType.ALL_F32)

    tokens, scores, types = _vocab(spec.n_vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    # No "▁" before text after a special token: the grammar sampler replays the generation prompt.
    writer.add_add_space_prefix(False)
    writer.add_chat_template(TEMPLATES[spec.template])

    n_vocab = len(tokens)
    weight_type = np.float16 if spec.f16 else np.float32

    def weight(*shape: int) -> np.ndarray:
        # Small values keep activations finite through the layers.
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(weight_type)

    def norm() -> np.ndarray:
        return np.ones(spec.n_embd, dtype=np.float32)

    writer.add_tensor("token_embd.weight", weight(n_vocab, spec.n_embd))
    for layer in range(spec.n_layer):
        prefix = f"blk.{layer}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", norm())
        for part in ("q", "k", "v", "output"):
            writer.add_tensor(f"{prefix}.attn_{part}.weight", weight(spec.n_embd, spec.n_embd))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", norm())
        writer.add_tensor(f"{prefix}.ffn_gate.weight", weight(spec.n_ff, spec.n_embd))
        writer.add_tensor(f"{prefix}.ffn_up.weight", weight(spec.n_ff, spec.n_embd))
        writer.add_tensor(f"{prefix}.ffn_down.weight", weight(spec.n_embd, spec.n_ff))
    writer.add_tensor("output_norm.weight", norm())
    writer.add_tensor("output.weight", weight(n_vocab, spec.n_embd))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _vocab(n_pieces: int) -> tuple[list[str], list[float], list[int]]:
    """An SPM vocabulary: specials, the 256 byte-fallback tokens, then `n_pieces` word pieces."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    types = [gguf.TokenType.UNKNOWN] + [gguf.TokenType.CONTROL] * 4
    tokens += [f"<0x{byte:02X}>" for byte in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    letters = "abcdefghijklmnopqrstuvwxyz"
    pieces = ["▁"] + [f"▁{c}" for c in letters] + list(letters)
    index = 0
    while len(pieces) < n_pieces:
        # Deterministic two- and three-letter pieces, then numbered ones.
        a, b = divmod(index, len(letters))
        word = letters[a % len(letters)] + letters[b] if a < len(letters) else f"w{index}"
        pieces.append(f"▁{word}" if index % 2 == 0 else word)
        index += 1
    pieces = list(dict.fromkeys(pieces))[:n_pieces]
    tokens += pieces
    types += [gguf.TokenType.NORMAL] * len(pieces)
    scores = [0.0] * (len(tokens) - len(pieces)) + [-float(i) for i in range(len(pieces))]
    return tokens, scores, [int(t) for t in types]


if __name__ == "__main__":
    for model_name in sys.argv[1:] or ["tiny"]:
        print(ensure_model(model_name))
