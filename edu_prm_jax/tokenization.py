"""Tokenizers for the policy and the PRM: one small interface over HF `tokenizers` and SentencePiece.

Why our own loader: the Qwen2/2.5 checkpoints we use ship `vocab.json` + `merges.txt` (no `tokenizer.json`),
and a generic byte-level BPE built from them gets chat markup, tabs and blank lines wrong. We rebuild Qwen's
exact pipeline (NFC, Qwen's split regex, byte-level BPE, the Qwen2.5 added tokens) with the `tokenizers`
library, so the ids match `transformers` without depending on it at run time. Chat templates are plain
Python (no jinja) so a prompt is a reviewable string.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from etils import epath

from edu_prm_jax.io import storage

QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_BPE_SIZE = 151643  # entries in Qwen2/2.5 vocab.json; the added tokens follow from this id
# Qwen2.5's added tokens in id order from 151643; the first 14 are special (skipped by skip_special_tokens).
QWEN25_ADDED_TOKENS: tuple[tuple[str, bool], ...] = tuple(
    (t, True) for t in (
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
        "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
        "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    )
) + tuple(
    (t, False) for t in (
        "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
        "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
    )
)

# --------------------------------------------------------------------------------------- chat templates

CHAT_PRESETS: dict[str, str | None] = {
    # preset name -> default system prompt (None: the template has no system block by default)
    "qwen2.5": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "qwen2.5-math": "Please reason step by step, and put your final answer within \\boxed{}.",
    "qwen2": "You are a helpful assistant.",
    "plain": None,
}
_CHATML_PRESETS = ("qwen2.5", "qwen2.5-math", "qwen2")


class _DefaultSystem:
    """Sentinel: 'use the preset's default system prompt' (None means 'no system block')."""

    def __repr__(self) -> str:
        return "DEFAULT_SYSTEM"


DEFAULT_SYSTEM: Any = _DefaultSystem()


def render_chat(messages: Sequence[dict[str, str]], preset: str, add_generation_prompt: bool = True) -> str:
    """Render `[{"role", "content"}, ...]` with a named preset.

    ChatML presets follow Qwen2.5's template: a system block first (the caller's, else the preset default),
    then `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, then `<|im_start|>assistant\\n` to cue the
    answer. "plain" is for toy tokenizers without markup tokens: `Question: ...\\nAnswer:\\n`.
    """
    if preset not in CHAT_PRESETS:
        raise ValueError(f"unknown chat preset {preset!r}; known: {sorted(CHAT_PRESETS)}")
    for i, m in enumerate(messages):
        if set(m) - {"role", "content"} or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must have exactly 'role' and 'content', got keys {sorted(m)}")
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"message {i}: unknown role {m['role']!r}")
    if preset == "plain":
        parts = []
        for m in messages:
            if m["role"] == "system":
                parts.append(f"{m['content']}\n")
            elif m["role"] == "user":
                parts.append(f"Question: {m['content']}\n")
            else:
                parts.append(f"Answer:\n{m['content']}\n")
        if add_generation_prompt:
            parts.append("Answer:\n")
        return "".join(parts)
    msgs = list(messages)
    if not msgs or msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": CHAT_PRESETS[preset]})
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _preset_from_template(template: str) -> str | None:
    """Recognise which preset a jinja chat_template (from tokenizer_config.json) corresponds to."""
    if "<|im_start|>" not in template:
        return None
    for preset in ("qwen2.5-math", "qwen2.5", "qwen2"):
        if CHAT_PRESETS[preset] in template:
            return preset
    return "qwen2.5"


# --------------------------------------------------------------------------------------------- tokenizer


class Tokenizer:
    """Backend-independent tokenizer: ids, special tokens and chat prompts.

    Subclasses wrap a backend and implement `encode`, `decode`, `vocab_size`, `token_to_id`, `id_to_piece`
    and `_decode_each`; this class derives EOS/pad ids and chat rendering from them.
    """

    def __init__(self, config: dict[str, Any], config_path: epath.Path | None, chat_preset: str | None):
        self.config = config
        self._texts: list[str] | None = None
        self.chat_preset = chat_preset or self._infer_preset()
        if self.chat_preset not in CHAT_PRESETS:
            raise ValueError(f"{config_path}: edu_prm_chat_template {self.chat_preset!r} is not one of "
                             f"{sorted(CHAT_PRESETS)}")
        self.eos_token_ids = self._resolve_eos(config_path)
        self.pad_token_id = self._resolve_pad(config_path)

    # backend methods -----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        """Id of a whole vocabulary piece (e.g. "<|im_end|>", "Ġthe"), or None if absent."""
        raise NotImplementedError

    def id_to_piece(self, i: int) -> str:
        raise NotImplementedError

    def _decode_each(self) -> list[str]:
        raise NotImplementedError

    def _backend_eos(self) -> list[int]:
        return []

    def _backend_pad(self) -> int | None:
        return None

    # shared logic --------------------------------------------------------------------------------------
    def decoded_token_texts(self) -> list[str]:
        """What each id decodes to on its own (cached); the symbol mask for entropy anchors is built on it."""
        if self._texts is None:
            self._texts = self._decode_each()
        return self._texts

    def _has(self, token: str) -> bool:
        return self.token_to_id(token) is not None

    def _infer_preset(self) -> str:
        """Config key `edu_prm_chat_template` wins; else the config's chat_template kind; else ChatML when the
        vocabulary has the markup tokens (ChatML text without them would be split into many pieces)."""
        if "edu_prm_chat_template" in self.config:
            return str(self.config["edu_prm_chat_template"])
        template = self.config.get("chat_template")
        if isinstance(template, str):
            found = _preset_from_template(template)
            if found:
                return found
        return "qwen2.5" if self._has("<|im_start|>") and self._has("<|im_end|>") else "plain"

    def _config_token_id(self, key: str, config_path: epath.Path | None) -> int | None:
        value = self.config.get(key)
        if isinstance(value, dict):  # older configs: {"content": "...", ...}
            value = value.get("content")
        if value is None:
            return None
        tid = self.token_to_id(value)
        if tid is None:
            raise ValueError(f"{config_path}: field {key!r} = {value!r} is not a token of this tokenizer")
        return tid

    def _resolve_eos(self, config_path: epath.Path | None) -> list[int]:
        """A ChatML model may end with <|im_end|> (end of turn) or <|endoftext|> (end of document): both
        stop generation, whatever single eos_token the config names; SentencePiece adds its </s>."""
        ids: list[int] = []
        candidates = [self._config_token_id("eos_token", config_path)]
        if self.chat_preset in _CHATML_PRESETS:
            candidates.append(self.token_to_id("<|im_end|>"))
        candidates += [self.token_to_id("<|endoftext|>"), *self._backend_eos()]
        for tid in candidates:
            if tid is not None and tid not in ids:
                ids.append(tid)
        return ids

    def _resolve_pad(self, config_path: epath.Path | None) -> int | None:
        for tid in (self._config_token_id("pad_token", config_path), self.token_to_id("<|endoftext|>"),
                    self._backend_pad()):
            if tid is not None:
                return tid
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def apply_chat_template(self, question: str, system: str | None = DEFAULT_SYSTEM,
                            add_generation_prompt: bool = True) -> str:
        """Single-turn prompt. `system`: omitted -> the preset default; None -> no system message given
        (ChatML presets then still insert their default, as Qwen's templates do)."""
        messages = [{"role": "user", "content": question}]
        if system is not None and system is not DEFAULT_SYSTEM:
            messages.insert(0, {"role": "system", "content": system})
        return render_chat(messages, self.chat_preset, add_generation_prompt)

    def encode_chat(self, question: str, system: str | None = DEFAULT_SYSTEM) -> list[int]:
        return self.encode(self.apply_chat_template(question, system))


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (from tokenizer.json, or Qwen's pipeline rebuilt from vocab+merges)."""

    def __init__(self, backend: Any, config: dict[str, Any], config_path: epath.Path | None,
                 chat_preset: str | None = None):
        self.backend = backend
        super().__init__(config, config_path, chat_preset)

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: no BOS/EOS post-processing; markup strings still map to their ids.
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_piece(self, i: int) -> str:
        piece = self.backend.id_to_token(i)
        if piece is None:
            raise IndexError(f"token id {i} out of range [0, {self.vocab_size})")
        return piece

    def _decode_each(self) -> list[str]:
        return self.backend.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=False)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model; markup strings must be `user_defined_symbols` so they encode as one id."""

    def __init__(self, processor: Any, config: dict[str, Any], config_path: epath.Path | None,
                 chat_preset: str | None = None):
        from sentencepiece import sentencepiece_model_pb2

        self.sp = processor
        # The Python API has no is_user_defined(); the model proto records each piece's type.
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(processor.serialized_model_proto())
        kinds = sentencepiece_model_pb2.ModelProto.SentencePiece
        special = (kinds.CONTROL, kinds.UNKNOWN, kinds.USER_DEFINED)
        self._special_ids = frozenset(i for i, p in enumerate(proto.pieces) if p.type in special)
        super().__init__(config, config_path, chat_preset)

    def encode(self, text: str) -> list[int]:
        # SentencePiece matches user_defined_symbols before segmentation, so "<|im_start|>" is one id.
        return list(self.sp.encode(text))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self.sp.decode(ids)

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    def token_to_id(self, token: str) -> int | None:
        i = int(self.sp.piece_to_id(token))
        # piece_to_id maps unknown strings to unk_id; only the unk piece itself may legitimately return it.
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def id_to_piece(self, i: int) -> str:
        if not 0 <= i < self.vocab_size:
            raise IndexError(f"token id {i} out of range [0, {self.vocab_size})")
        return self.sp.id_to_piece(i)

    def _decode_each(self) -> list[str]:
        return [self.sp.decode([i]) for i in range(self.vocab_size)]

    def _backend_eos(self) -> list[int]:
        return [self.sp.eos_id()] if self.sp.eos_id() >= 0 else []

    def _backend_pad(self) -> int | None:
        return self.sp.pad_id() if self.sp.pad_id() >= 0 else None


# ------------------------------------------------------------------------------------------------ loading


def _read_json(path: epath.Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e


def _added_tokens(vocab_size: int, config: dict[str, Any], config_path: epath.Path | None
                  ) -> list[tuple[int, str, bool]]:
    """(id, content, special) to append after the BPE vocab: Qwen2.5's list when the vocab is Qwen's, plus
    the config's `added_tokens_decoder`; ids must agree and run contiguously from the vocab size."""
    table: dict[int, tuple[str, bool]] = {}
    if vocab_size == QWEN_BPE_SIZE:
        table = {QWEN_BPE_SIZE + k: tok for k, tok in enumerate(QWEN25_ADDED_TOKENS)}
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        tid, content = int(key), entry["content"]
        if tid in table and table[tid][0] != content:
            raise ValueError(f"{config_path}: added_tokens_decoder[{key}] = {content!r} conflicts with "
                             f"{table[tid][0]!r}")
        table[tid] = (content, bool(entry.get("special", True)))
    ids = sorted(table)
    if ids and ids != list(range(vocab_size, vocab_size + len(ids))):
        raise ValueError(f"{config_path}: added token ids {ids[0]}..{ids[-1]} are not contiguous from the "
                         f"vocab size {vocab_size}")
    return [(i, *table[i]) for i in ids]


def build_qwen_bpe(vocab_path: epath.Path, merges_path: epath.Path, config: dict[str, Any] | None = None,
                   config_path: epath.Path | None = None) -> Any:
    """Qwen2/2.5's tokenizer.json pipeline, rebuilt from vocab.json + merges.txt."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFBackend

    vocab = _read_json(vocab_path)
    if not isinstance(vocab, dict):
        raise ValueError(f"{vocab_path}: expected a JSON object mapping token -> id")
    merges = []
    with merges_path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line or (lineno == 1 and line.startswith("#version")):
                continue
            pair = line.split(" ")
            if len(pair) != 2:
                raise ValueError(f"{merges_path}:{lineno}: expected two space-separated pieces, got {line!r}")
            merges.append((pair[0], pair[1]))
    tok = HFBackend(models.BPE(vocab=vocab, merges=merges, unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    for tid, content, special in _added_tokens(len(vocab), config or {}, config_path):
        added = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False,
                           special=special)
        (tok.add_special_tokens if special else tok.add_tokens)([added])
        if tok.token_to_id(content) != tid:
            raise ValueError(f"{vocab_path}: added token {content!r} got id {tok.token_to_id(content)}, "
                             f"expected {tid} (is it already in vocab.json?)")
    return tok


def load_tokenizer(path: str | epath.Path, chat_preset: str | None = None) -> Tokenizer:
    """Load from a directory holding tokenizer.json, vocab.json + merges.txt, or tokenizer.model
    (SentencePiece); or from one such file. A tokenizer_config.json beside it sets eos/pad/chat preset."""
    path = storage.as_path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path {path} does not exist")
    folder = path if path.is_dir() else path.parent
    config_path = folder / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object")
    cfg_path = config_path if config_path.is_file() else None

    if path.is_file():
        if path.suffix == ".model":
            return _load_sentencepiece(path, config, cfg_path, chat_preset)
        if path.suffix == ".json" and path.name != "vocab.json":
            return _load_tokenizer_json(path, config, cfg_path, chat_preset)
        if path.name not in ("vocab.json", "merges.txt"):
            raise ValueError(f"{path}: not a tokenizer file (want tokenizer.json, vocab.json/merges.txt or "
                             f"a SentencePiece *.model)")
    if (folder / "tokenizer.json").is_file() and path.is_dir():
        return _load_tokenizer_json(folder / "tokenizer.json", config, cfg_path, chat_preset)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    if vocab_path.is_file() or merges_path.is_file():
        missing = [p.name for p in (vocab_path, merges_path) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: byte-level BPE needs vocab.json and merges.txt; missing "
                                    f"{', '.join(missing)}")
        backend = build_qwen_bpe(vocab_path, merges_path, config, cfg_path)
        return HFTokenizer(backend, config, cfg_path, chat_preset)
    models_ = sorted(folder.glob("*.model"))
    if (folder / "tokenizer.model").is_file():
        return _load_sentencepiece(folder / "tokenizer.model", config, cfg_path, chat_preset)
    if len(models_) == 1:
        return _load_sentencepiece(models_[0], config, cfg_path, chat_preset)
    hint = f"; several *.model files, pass one: {[m.name for m in models_]}" if models_ else ""
    raise FileNotFoundError(f"{folder}: no tokenizer found; looked for tokenizer.json, vocab.json + "
                            f"merges.txt, or tokenizer.model (SentencePiece){hint}")


def _load_tokenizer_json(path: epath.Path, config: dict[str, Any], cfg_path: epath.Path | None,
                         chat_preset: str | None) -> Tokenizer:
    from tokenizers import Tokenizer as HFBackend

    try:
        backend = (HFBackend.from_file(str(path)) if storage.is_local(path)
                   else HFBackend.from_str(path.read_text(encoding="utf-8")))
    except Exception as e:  # the Rust error names the field but not the file
        raise ValueError(f"{path}: cannot load tokenizer.json: {e}") from e
    return HFTokenizer(backend, config, cfg_path, chat_preset)


def _load_sentencepiece(path: epath.Path, config: dict[str, Any], cfg_path: epath.Path | None,
                        chat_preset: str | None) -> Tokenizer:
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor()
    try:
        if storage.is_local(path):
            processor.load(str(path))
        else:  # SentencePiece reads local files only; a remote model is handed over as bytes
            processor.load(model_proto=path.read_bytes())
    except Exception as e:
        raise ValueError(f"{path}: cannot load SentencePiece model: {e}") from e
    return SentencePieceTokenizer(processor, config, cfg_path, chat_preset)

