"""Tokenizers: a thin wrapper over HF `tokenizers.Tokenizer`, its chat template, and streaming decode.

    tok = Tokenizer.from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")      # or a GGUFTokenizerInfo
    tok = Tokenizer.from_folder("all-MiniLM-L6-v2/")                   # tokenizer.json + tokenizer_config.json
    ids = tok.encode("Hello")                                          # list[int]
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    dec = StreamDecoder(tok); text = "".join(dec.push(i) for i in generated_ids)

All tokenization is done by the Rust `tokenizers` library; this module only assembles the pipeline a
GGUF file describes (the same one transformers builds from it) and reads a HF folder's special tokens.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.models import BPE

from plm_engine.models.gguf import TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED, GGUFTokenizerInfo, read_gguf_tokenizer

# Split regexes of llama.cpp's `tokenizer.ggml.pre` names (as in llama.cpp / transformers); other names,
# e.g. SmolLM2's "smollm" or GPT-2's "gpt-2", use the ByteLevel pre-tokenizer's own GPT-2 regex.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
    "megrez": _QWEN2_SPLIT,
}
# Tokens that end a chat turn in common templates; one that the template writes becomes a stop token.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|end_of_text|>")


class Tokenizer:
    """Text <-> token ids, special tokens and the chat template of one model.

    backend: a `tokenizers.Tokenizer` with its whole pipeline (normalizer, pre-tokenizer, model,
    post-processor adding BOS/CLS/SEP, decoder). The special tokens are given as strings and looked up
    in the backend's vocabulary; a token that is not in it is an error.
    """

    def __init__(
        self,
        backend: _HFTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        clean_up_tokenization_spaces: bool = False,
        name: str = "",
    ):
        self.backend = backend
        self.name = name
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.bos_token_id = self._special_id("bos_token", bos_token)
        self.eos_token_id = self._special_id("eos_token", eos_token)
        self.pad_token_id = self._special_id("pad_token", pad_token)
        self.unk_token_id = self._special_id("unk_token", unk_token)
        self.cls_token_id = self.sep_token_id = self.mask_token_id = None  # set by from_folder for encoders
        self.stop_token_ids: set[int] = {self.eos_token_id} if self.eos_token_id is not None else set()
        for token in _END_OF_TURN:
            token_id = backend.token_to_id(token)
            if chat_template and token in chat_template and token_id is not None:
                self.stop_token_ids.add(token_id)

    def _special_id(self, what: str, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer {self.name or ''}: {what} {token!r} is not in the vocabulary")
        return token_id

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r})"

    # ---- constructors ------------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, source: GGUFTokenizerInfo | str | os.PathLike) -> Tokenizer:
        """From a GGUF file's metadata (a path, or the GGUFTokenizerInfo that read_gguf returned).

        "gpt2" models (byte-level BPE: GPT-2, Llama 3, Qwen2, SmolLM2) and "llama" models (sentencepiece
        BPE with byte fallback: Llama 2, Mistral) are supported; others raise ValueError.
        """
        info = source if isinstance(source, GGUFTokenizerInfo) else read_gguf_tokenizer(source)
        if info.model == "gpt2":
            backend = _byte_level_bpe(info)
        elif info.model == "llama":
            backend = _sentencepiece_bpe(info)
        else:
            raise ValueError(
                f"{info.path}: GGUF tokenizer model {info.model!r} is not supported "
                f"(supported: 'gpt2' byte-level BPE, 'llama' sentencepiece BPE)"
            )
        _add_gguf_special_tokens(backend, info)
        _add_bos_eos(backend, info)

        def token(token_id):
            if token_id is None:
                return None
            if not 0 <= token_id < len(info.tokens):
                raise ValueError(
                    f"{info.path}: special token id {token_id} is outside the vocabulary of {len(info.tokens)} tokens"
                )
            return info.tokens[token_id]

        return cls(
            backend,
            bos_token=token(info.bos_token_id),
            eos_token=token(info.eos_token_id),
            pad_token=token(info.pad_token_id),
            unk_token=token(info.unk_token_id),
            chat_template=info.chat_template,
            name=info.path,
        )

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> Tokenizer:
        """From a HF folder: tokenizer.json, plus tokenizer_config.json / special_tokens_map.json for the
        special tokens and the chat template (also read from chat_template.jinja / .json when present)."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {folder}")
        tokenizer_json = folder / "tokenizer.json"
        if not tokenizer_json.is_file():
            raise FileNotFoundError(f"{folder}: no tokenizer.json (only fast-tokenizer folders are supported)")
        try:
            backend = _HFTokenizer.from_file(str(tokenizer_json))
        except Exception as e:
            raise ValueError(f"{tokenizer_json}: cannot be read as a tokenizers JSON file: {e}") from e
        # Some tokenizer.json files pin padding/truncation (MiniLM pads to 128); like transformers, encode
        # exactly the text and leave padding and length limits to the caller.
        backend.no_padding()
        backend.no_truncation()
        config = _read_json(folder / "tokenizer_config.json")
        special = {**_read_json(folder / "special_tokens_map.json"), **config}
        chat_template = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            chat_template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        elif (folder / "chat_template.json").is_file():
            chat_template = _read_json(folder / "chat_template.json").get("chat_template")
        if isinstance(chat_template, list):  # several named templates: use the default one
            chat_template = next((t["template"] for t in chat_template if t.get("name") == "default"), None)

        def token(key, *fallbacks):
            for k in (key, *fallbacks):
                value = special.get(k)
                if isinstance(value, dict):  # serialized AddedToken
                    value = value.get("content")
                if value is not None:
                    return value
            return None

        tok = cls(
            backend,
            bos_token=token("bos_token"),
            eos_token=token("eos_token"),
            pad_token=token("pad_token"),
            unk_token=token("unk_token"),
            chat_template=chat_template,
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            name=str(folder),
        )
        # Encoders (BERT) have no BOS/EOS but CLS/SEP/MASK, which pooling and masked-LM training need.
        tok.cls_token_id = tok._special_id("cls_token", token("cls_token"))
        tok.sep_token_id = tok._special_id("sep_token", token("sep_token"))
        tok.mask_token_id = tok._special_id("mask_token", token("mask_token"))
        return tok

    # ---- encode / decode ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the model's embedding rows may be more)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode_batch: texts must be a list of str")
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        n = self.vocab_size
        bad = next((i for i in ids if not 0 <= i < n), None)
        if bad is not None:
            raise ValueError(f"decode: token id {bad} is out of range for a vocabulary of {n} tokens")
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    # ---- chat --------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the model's chat template, as
        transformers' apply_chat_template(tokenize=False) does (same sandbox, options and variables)."""
        if not self.chat_template:
            raise ValueError(f"tokenizer {self.name}: has no chat template")
        if isinstance(messages, dict) or not all(isinstance(m, dict) for m in messages):
            raise ValueError(
                "apply_chat_template: messages must be a list of dicts like {'role': 'user', 'content': '...'}"
            )
        missing = next((m for m in messages if "role" not in m), None)
        if missing is not None:
            raise ValueError(f"apply_chat_template: message without a 'role': {missing!r}")
        variables = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            **kwargs,
        }
        return _compile_template(self.chat_template).render(
            messages=[dict(m) for m in messages],
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )


class StreamDecoder:
    """Incremental detokenization for streaming: push generated ids, get newly completed text.

    Decoding token by token breaks byte-level tokens that hold part of a UTF-8 character and drops the
    spaces some decoders (sentencepiece) derive from context. So the decoder keeps the ids since the last
    emitted boundary, decodes them with a few earlier ids as context, and emits the new suffix only
    when it does not end in U+FFFD (an incomplete character). The concatenation of all pushes (plus
    flush()) equals decode() of all ids.
    """

    _CONTEXT = 4  # earlier ids decoded along with the pending ones, so context-dependent spaces come out right

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_start = 0  # where the context window starts
        self._read = 0  # ids before this index have been emitted

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prefix = self.tokenizer.decode(self._ids[self._prefix_start : self._read], self.skip_special_tokens)
        text = self.tokenizer.decode(self._ids[self._prefix_start :], self.skip_special_tokens)
        if text.endswith("\ufffd") or len(text) <= len(prefix) or not text.startswith(prefix):
            return ""
        self._prefix_start = max(0, len(self._ids) - self._CONTEXT)
        self._read = len(self._ids)
        return text[len(prefix) :]

    def flush(self) -> str:
        """Whatever is still pending (e.g. an incomplete character at the end of the stream)."""
        prefix = self.tokenizer.decode(self._ids[self._prefix_start : self._read], self.skip_special_tokens)
        text = self.tokenizer.decode(self._ids[self._prefix_start :], self.skip_special_tokens)
        self._prefix_start = self._read = len(self._ids)
        return text[len(prefix) :] if text.startswith(prefix) else ""


# ---- GGUF pipelines --------------------------------------------------------------------------------


def _byte_level_bpe(info: GGUFTokenizerInfo) -> _HFTokenizer:
    vocab = {token: i for i, token in enumerate(info.tokens)}
    merges = [tuple(m.split(" ", 1)) for m in info.merges]
    backend = _HFTokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    split = _PRE_SPLITS.get(info.pre or "")
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(info: GGUFTokenizerInfo) -> _HFTokenizer:
    vocab = {token: i for i, token in enumerate(info.tokens)}
    merges = [tuple(m.split(" ", 1)) for m in info.merges] or _merges_from_scores(info)
    unk = info.tokens[info.unk_token_id] if info.unk_token_id is not None else None
    backend = _HFTokenizer(
        BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True, dropout=None)
    )
    # Sentencepiece writes spaces as U+2581 and (with add_space_prefix) prefixes the text with one.
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if info.add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if info.add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_scores(info: GGUFTokenizerInfo) -> list[tuple[str, str]]:
    """Sentencepiece GGUFs usually carry scores, not merges: every split of a token into two vocabulary
    pieces is a merge, ranked by the merged token's score (higher first), as transformers rebuilds them."""
    if not info.scores:
        raise ValueError(f"{info.path}: sentencepiece GGUF tokenizer has neither merges nor scores")
    vocab = {token: i for i, token in enumerate(info.tokens)}
    merges = []
    for token, score in zip(info.tokens, info.scores):
        local = [
            (token[:k], token[k:], score) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab
        ]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _add_gguf_special_tokens(backend: _HFTokenizer, info: GGUFTokenizerInfo) -> None:
    """CONTROL tokens (<|im_start|>, <s>, ...) become special added tokens and USER_DEFINED ones plain
    added tokens, so the text "<|im_start|>" is one token, as in llama.cpp and transformers."""
    alphabet = set(pre_tokenizers.ByteLevel.alphabet()) if info.model == "gpt2" else None
    control, user = [], []
    for token, kind in zip(info.tokens, info.token_types):
        if kind == TOKEN_TYPE_CONTROL and (alphabet is None or set(token) <= alphabet):
            control.append(AddedToken(token, normalized=False, special=True))
        elif kind == TOKEN_TYPE_USER_DEFINED:
            user.append(AddedToken(token, normalized=False, special=False))
    for kind in (info.bos_token_id, info.eos_token_id, info.unk_token_id, info.pad_token_id):
        # Special ids the metadata names are special even if the file mislabels their type.
        if kind is not None and 0 <= kind < len(info.tokens) and info.token_types[kind] != TOKEN_TYPE_CONTROL:
            control.append(AddedToken(info.tokens[kind], normalized=False, special=True))
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


def _add_bos_eos(backend: _HFTokenizer, info: GGUFTokenizerInfo) -> None:
    bos = info.tokens[info.bos_token_id] if info.add_bos_token and info.bos_token_id is not None else None
    eos = info.tokens[info.eos_token_id] if info.add_eos_token and info.eos_token_id is not None else None
    if bos is None and eos is None:
        return
    single = " ".join([f"{bos}:0"] * (bos is not None) + ["$A:0"] + [f"{eos}:0"] * (eos is not None))
    pair = " ".join([single] + [f"{bos}:1"] * (bos is not None) + ["$B:1"] + [f"{eos}:1"] * (eos is not None))
    specials = [(t, backend.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x is not None)]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


# ---- helpers ---------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization: remove the spaces WordPiece decoding puts before punctuation."""
    for a, b in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(a, b)
    return text


@lru_cache(maxsize=16)
def _compile_template(source: str):
    """A chat template compiled in the sandbox transformers uses (trim_blocks, lstrip_blocks,
    loopcontrols, a non-HTML-escaping tojson, raise_exception, strftime_now): templates are untrusted."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not compile: {e}") from e
