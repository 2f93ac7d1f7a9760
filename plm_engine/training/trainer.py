"""The training loop: causal-LM / masked-LM / seq2seq-denoising pretraining and sequence-classification
fine-tuning on the fused kernels (attention fwd+bwd, norms, linear cross-entropy all come from plm_engine.ops).

    from plm_engine.training import Trainer, TrainConfig
    cfg = TrainConfig(objective="clm", model="gpt2-tiny", data=["shakespeare"], tokenizer="bpe", max_steps=200)
    summary = Trainer(cfg).run()

One optimizer step = grad_accum micro-batches per process; the global batch is batch_size * grad_accum
* world_size sequences, drawn by a ResumableSampler so any resume or process count sees the same data.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import threading
import time

import torch

from plm_engine.models.meta import meta_device
from plm_engine.models.transformer import PaddingLayout
from plm_engine.ops import checks
from plm_engine.training import checkpoint as ckpt
from plm_engine.training import data as D
from plm_engine.training import distributed as dist_utils
from plm_engine.training.config import TrainConfig
from plm_engine.training.metrics import (
    MetricsLogger,
    classification_scores,
    flops_per_token,
    peak_flops,
    perplexity,
    plot_log,
)
from plm_engine.training.schedule import make_scheduler

EVAL_EPOCH = 1 << 20  # sample_generator epoch of eval masking: never a training epoch


@contextlib.contextmanager
def ops_backend(backend: str | None):
    """Route every plm_engine.ops call through `backend` (PLM_ENGINE_BACKEND) for the duration."""
    if backend is None:
        yield
        return
    old = os.environ.get("PLM_ENGINE_BACKEND")
    os.environ["PLM_ENGINE_BACKEND"] = backend
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PLM_ENGINE_BACKEND", None)
        else:
            os.environ["PLM_ENGINE_BACKEND"] = old


class Trainer:
    def __init__(self, config: TrainConfig):
        config.validate()
        self.cfg = cfg = config
        want = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.dist = dist_utils.init(cfg.distributed, torch.device(want).type)
        self.device = torch.device(want)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank if self.dist.enabled else (self.device.index or 0))
        self.ckpt_root = os.path.join(cfg.out_dir, "checkpoints")
        self.step = 0
        self.tokens_seen = 0
        self.last_eval: dict = {}
        self.best: dict | None = None  # keep_best: {step, metric, value, val} of the weights in best_dir
        self.best_dir = os.path.join(cfg.out_dir, "best")
        self._stop_signal: int | None = None
        resume_path = ckpt.resolve_resume(cfg.resume, self.ckpt_root) if cfg.resume else None
        resume_files = ckpt.load_trainer_files(resume_path) if resume_path else None
        self.resume_path = resume_path

        with ops_backend(cfg.backend):
            self.tokenizer = self._build_tokenizer(resume_path)
            self._build_data()
            torch.manual_seed(cfg.seed)  # the same initial weights on every process and every rerun
            self.model = self._build_model(resume_path)
            # Every process fits the same head from the same weights and examples (before any wrapping).
            probe = self._probe_head() if cfg.probe_examples and resume_path is None else None
        self.n_params = self.model.num_parameters()
        self.flops_per_token = flops_per_token(self.model.config, cfg.seq_len, self.n_params)
        self._peak: float | None = cfg.peak_flops or None
        if cfg.activation_checkpointing:
            self._checkpoint_blocks()
        self.net = Objective(self.model, cfg.objective)
        self.wrapped = dist_utils.wrap(self.net, _blocks(self.model), self.dist, self.device)
        self.forward_module = torch.compile(self.wrapped) if cfg.compile else self.wrapped
        self.optimizer = self._build_optimizer()
        self.scheduler = make_scheduler(
            self.optimizer, cfg.schedule, cfg.warmup_steps, max(1, cfg.max_steps), cfg.min_lr_ratio, cfg.decay_fraction
        )
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "fp16" else None
        if resume_files is not None:
            self._restore(*resume_files)
        elif cfg.keep_best and self.dist.is_main:
            shutil.rmtree(self.best_dir, ignore_errors=True)  # an earlier run's best is not this run's
        self.logger = MetricsLogger(
            cfg.out_dir, enabled=self.dist.is_main, resume_step=self.step if resume_path else None
        )
        self.probed = probe is not None
        if probe is not None:
            self.logger.log(probe)

    # ---- construction -------------------------------------------------------------------------------

    def _build_tokenizer(self, resume_path: str | None) -> D.TextTokenizer:
        cfg = self.cfg
        if resume_path and os.path.isfile(os.path.join(resume_path, "tokenizer.json")):
            return D.TextTokenizer.from_folder(resume_path)  # exactly the run's tokenizer
        if cfg.tokenizer == "model":
            if cfg.init is None:
                raise ValueError(
                    "tokenizer='model' needs init=<checkpoint>; from a preset use tokenizer='bpe' or a tokenizer folder"
                )
            return D.TextTokenizer.from_model(cfg.init)
        if cfg.tokenizer == "bpe":
            files = self._corpus_files(cfg.data)
            style = "bert" if cfg.objective == "mlm" or (cfg.model or "").startswith("bert") else "causal"
            style = "seq2seq" if cfg.objective == "seq2seq" else style
            cache = self._cache_dir()
            key = D._corpus_key(files, _NoTokenizer(f"bpe-{cfg.bpe_vocab_size}-{style}"), None)
            path = os.path.join(cache, f"bpe-{key}")
            if os.path.isfile(os.path.join(path, "tokenizer.json")):
                return D.TextTokenizer.from_folder(path)
            tok = D.train_bpe(files, cfg.bpe_vocab_size, style)
            if self.dist.is_main:
                tmp = f"{path}.tmp-{os.getpid()}"
                tok.save(tmp)
                os.replace(tmp, path) if not os.path.exists(path) else None
            return tok
        return D.TextTokenizer.from_folder(cfg.tokenizer)

    def _cache_dir(self) -> str:
        return self.cfg.cache_dir or os.path.join(self.cfg.out_dir, "cache")

    def _corpus_files(self, paths) -> list[str]:
        if self.cfg.dataset == "shakespeare-genre":
            from plm_engine.training import shakespeare

            return shakespeare.text_files()
        if self.cfg.dataset == "jsonl":
            texts, _, _ = D.read_jsonl_examples(paths)
            path = os.path.join(self._cache_dir(), "jsonl-texts.txt")
            os.makedirs(self._cache_dir(), exist_ok=True)
            with open(path, "w") as f:
                f.write("\n".join(texts))
            return [path]
        return D.list_text_files(paths)

    def _build_data(self) -> None:
        cfg, tok = self.cfg, self.tokenizer
        self.global_batch = cfg.batch_size * cfg.grad_accum * self.dist.world_size
        self.val_set = None
        if cfg.objective == "classify":
            self._build_classification()
        else:
            if cfg.dataset != "text":
                raise ValueError(
                    f"objective {cfg.objective!r} trains on text corpora (dataset='text'), got dataset={cfg.dataset!r}"
                )
            if cfg.objective == "clm":
                sep, cls, block = tok.eos_token_id, None, cfg.seq_len
            elif cfg.objective == "seq2seq":  # the target is the block and </s>
                sep, cls, block = tok.eos_token_id, None, cfg.seq_len - 1
                if None in (tok.eos_token_id, tok.pad_token_id, tok.mask_token_id):
                    raise ValueError(
                        "objective='seq2seq' needs a tokenizer with </s>, <pad> and <mask> tokens "
                        "(a BART tokenizer, or tokenizer='bpe' which adds them)"
                    )
                self.sentence_ends = _sentence_end_ids(tok) if cfg.permute_sentences else None
            else:
                cls, sep, block = tok.cls_token_id, tok.sep_token_id, cfg.seq_len - 2
                if None in (cls, sep, tok.mask_token_id):
                    raise ValueError(
                        "objective='mlm' needs a tokenizer with [CLS], [SEP] and [MASK] tokens "
                        "(a BERT tokenizer, or tokenizer='bpe' which adds them)"
                    )
            files = D.list_text_files(cfg.data)
            corpus = D.tokenize_corpus(files, tok, self._cache_dir(), separator=sep)
            self.corpus = corpus
            if cfg.eval_data:
                ev = D.tokenize_corpus(D.list_text_files(cfg.eval_data), tok, self._cache_dir(), separator=sep)
                self.train_set = D.PackedBlocks(corpus.tokens, block, cls=cls, sep=sep)
                self.eval_set = D.PackedBlocks(ev.tokens, block, cls=cls, sep=sep)
            else:
                # The eval split is the tail of the token stream (whole documents at the end when the
                # corpus has several): no eval block overlaps a training block.
                n_eval = int(len(corpus) * cfg.eval_fraction)
                cut = len(corpus) - n_eval
                self.train_set = D.PackedBlocks(corpus.tokens, block, 0, cut, cls=cls, sep=sep)
                self.eval_set = D.PackedBlocks(corpus.tokens, block, cut, cls=cls, sep=sep) if n_eval >= block else None
        self.sampler = D.ResumableSampler(len(self.train_set), self.global_batch, seed=cfg.seed)

    def _build_classification(self) -> None:
        cfg, tok = self.cfg, self.tokenizer
        if cfg.dataset == "shakespeare-genre":
            from plm_engine.training import shakespeare

            train, evals = shakespeare.genre_passages(cfg.passage_lines)
            names = list(shakespeare.GENRES)
            # The baselines fit on every passage outside the held-out plays, the validation plays
            # included: they get at least the data the model trains and selects on.
            self.baseline_texts, self.baseline_labels = train["text"], train["label"]
            if cfg.keep_best:  # whole plays validate, as whole plays evaluate
                train, val = shakespeare.take_plays(train, shakespeare.VAL_PLAYS)
                val_x, val_y = val["text"], val["label"]
            train_x, train_y, eval_x, eval_y = train["text"], train["label"], evals["text"], evals["label"]
            self.eval_groups = evals["play"]
        elif cfg.dataset == "jsonl":
            x, y, names = D.read_jsonl_examples(cfg.data)
            if cfg.eval_data:
                eval_x, eval_y, eval_names = D.read_jsonl_examples(cfg.eval_data)
                if eval_names and names and eval_names != names:
                    eval_y = [names.index(eval_names[i]) for i in eval_y]
                train_x, train_y = x, y
            else:
                perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
                n_eval = max(1, int(len(x) * cfg.eval_fraction))
                ev, tr = set(perm[:n_eval]), perm[n_eval:]
                train_x, train_y = [x[i] for i in tr], [y[i] for i in tr]
                eval_x, eval_y = [x[i] for i in sorted(ev)], [y[i] for i in sorted(ev)]
            self.baseline_texts, self.baseline_labels = train_x, train_y
            if cfg.keep_best:  # a seeded share of the training rows validates
                perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(cfg.seed + 2)).tolist()
                n_val = max(1, int(len(train_x) * cfg.val_fraction))
                if n_val >= len(train_x):
                    raise ValueError(f"keep_best: {len(train_x)} training rows leave none after the validation split")
                va, tr = sorted(perm[:n_val]), sorted(perm[n_val:])
                val_x, val_y = [train_x[i] for i in va], [train_y[i] for i in va]
                train_x, train_y = [train_x[i] for i in tr], [train_y[i] for i in tr]
        else:
            raise ValueError(f"objective 'classify' needs dataset 'jsonl' or 'shakespeare-genre', got {cfg.dataset!r}")
        self.train_texts, self.train_labels, self.eval_texts, self.eval_labels = train_x, train_y, eval_x, eval_y
        self.train_set = D.ClassificationSet(train_x, train_y, tok, cfg.seq_len, names)
        self.eval_set = D.ClassificationSet(eval_x, eval_y, tok, cfg.seq_len, names)
        self.val_set = D.ClassificationSet(val_x, val_y, tok, cfg.seq_len, names) if cfg.keep_best else None
        self.num_labels = cfg.num_labels or max(self.train_set.num_labels, self.eval_set.num_labels)
        self.label_names = names

    def _build_model(self, resume_path: str | None):
        from plm_engine.models import ModelConfig, build_model, load_model

        cfg, tok = self.cfg, self.tokenizer
        changes = {}
        if cfg.objective == "classify":
            changes["num_labels"] = self.num_labels
        if cfg.objective == "mlm":
            changes["mlm_head"] = True
        if cfg.init is not None:
            base = load_model(cfg.init, dtype=torch.float32, device="cpu", dequantize=True)  # trains plain weights
            mc = base.config.replace(**changes, **cfg.model_overrides)
        else:
            base = None
            ids = {
                "vocab_size": tok.vocab_size,
                "bos_token_id": tok.bos_token_id,
                "eos_token_id": tok.eos_token_id,
                "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            }
            if cfg.objective == "seq2seq":  # as BART: the decoder starts from </s>
                ids["decoder_start_token_id"] = tok.eos_token_id
            # Built from the preset's keys (not replace()), so derived sizes (head_dim, n_kv_heads,
            # intermediate_size) follow overridden hidden_size / n_heads.
            mc = ModelConfig.preset(cfg.model, **{**ids, **changes, **cfg.model_overrides})
        if mc.vocab_size < tok.vocab_size:
            raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {mc.vocab_size}")
        if cfg.seq_len > mc.max_position_embeddings:
            raise ValueError(
                f"seq_len {cfg.seq_len} exceeds the model's max_position_embeddings {mc.max_position_embeddings}"
            )
        if cfg.objective == "clm" and not mc.causal:
            raise ValueError(f"objective 'clm' needs a causal model, got arch {mc.arch!r}")
        if cfg.objective == "mlm" and mc.arch != "bert":
            raise ValueError(f"objective 'mlm' needs a BERT model, got arch {mc.arch!r}")
        if (cfg.objective == "seq2seq") != mc.is_encoder_decoder:
            raise ValueError(
                f"objective {cfg.objective!r} and arch {mc.arch!r} do not fit: objective 'seq2seq' trains the "
                "encoder-decoder archs (bart, t5), and only it does"
            )
        model = build_model(mc)
        if base is not None:
            # New heads (classifier, MLM head) keep their fresh init; everything else comes from the checkpoint.
            missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
            heads = ("classifier.", "mlm_", "lm_head.")
            # A smaller n_layers keeps the checkpoint's lowest blocks (a truncated trunk: a middle layer's
            # features often classify better than the last one's, at a fraction of the compute).
            dropped = _dropped_blocks(base.config, mc)
            bad = [k for k in missing if not k.startswith(heads)]
            bad += [k for k in unexpected if not k.startswith(heads + dropped)]
            if bad:
                raise ValueError(f"init {cfg.init!r} does not fit the model config: tensors {bad[:4]}")
            del base
        if resume_path is not None:
            saved = load_model(resume_path, dtype=torch.float32, device="cpu")
            model.load_state_dict(saved.state_dict(), strict=True)
        return model.to(self.device).train()

    @torch.no_grad()
    def _probe_head(self) -> dict:
        """LP-FT (training/probe.py): the classifier head fitted on the frozen model's pooled features of
        a seeded sample of probe_examples training examples. Returns the fit's log record."""
        from plm_engine.training.probe import fit_linear_head

        cfg, model = self.cfg, self.model
        n = len(self.train_set)
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 3))
        pick = (pick if cfg.probe_examples < 0 else pick[: cfg.probe_examples]).tolist()
        model.eval()
        feats, labels = [], []
        for i in range(0, len(pick), cfg.batch_size):
            batch = self._collate(pick[i : i + cfg.batch_size], EVAL_EPOCH, self.train_set)
            with self._autocast(), checks.trusted():
                hidden = model.hidden_states(
                    batch["input_ids"], batch.get("attention_mask"), layout=batch.get("layout")
                )
                feats.append(model.pool(hidden, batch.get("attention_mask")).float().cpu())
            labels.append(batch["labels"].cpu())
        model.train()
        head = model.classifier
        weight, bias, record = fit_linear_head(
            torch.cat(feats), torch.cat(labels), self.num_labels, head.bias is not None, l2=cfg.probe_l2
        )
        head.weight.copy_(weight.to(head.weight))
        if bias is not None:
            head.bias.copy_(bias.to(head.bias))
        return {"step": 0, "split": "probe", **record}

    def _checkpoint_blocks(self) -> None:
        """Recompute each block's activations in backward instead of storing them (instance-level
        forward wrap: parameter names stay the same, so checkpoints are unaffected)."""
        from torch.utils.checkpoint import checkpoint

        for block in _blocks(self.model):
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        decay, no_decay = [], []
        for p in self.wrapped.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)  # no decay on norms and biases
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # Fused AdamW is one kernel for all parameters (CPU and CUDA); FSDP's DTensors take the foreach path.
        kind = {"foreach": True} if self.dist.mode == "fsdp" else {"fused": True}
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kind)

    # ---- state ----------------------------------------------------------------------------------------

    def _full_state(self) -> tuple[dict, dict]:
        """(model state, optimizer state) as plain full tensors (gathered from the shards under FSDP)."""
        if self.dist.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return (
                get_model_state_dict(self.model, options=opts),
                get_optimizer_state_dict(self.model, self.optimizer, options=opts),
            )
        return self.model.state_dict(), self.optimizer.state_dict()

    def _plain_model(self, model_state: dict):
        """A Transformer with the full weights that save_pretrained can write: the model itself, or under
        FSDP one built around the gathered state."""
        from plm_engine.models import build_model

        if self.dist.mode != "fsdp":
            return self.model
        with meta_device():
            plain = build_model(self.model.config)
        plain.load_state_dict(model_state, assign=True)
        return plain

    def save(self) -> str | None:
        """Write a checkpoint of the current step (every process takes part; rank 0 writes)."""
        from plm_engine.models import save_pretrained

        model_state, optim_state = self._full_state()
        path = None
        if self.dist.is_main:
            plain = self._plain_model(model_state)
            tensors = {
                "optimizer": optim_state,
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else {},
                "rng": ckpt.rng_state(),
            }
            state = {
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "sampler": self.sampler.state_dict(),
                "world_size": self.dist.world_size,
                "config": self.cfg.to_dict(),
                "last_eval": self.last_eval,
                "best": self.best,
            }
            path = ckpt.save_checkpoint(
                self.ckpt_root,
                self.step,
                lambda d: save_pretrained(plain, d),
                tensors,
                state,
                self.tokenizer,
                self.cfg.keep_last,
            )
        dist_utils.barrier(self.dist)
        return path

    def _restore(self, tensors: dict, state: dict) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.last_eval = state.get("last_eval", {})
        best = state.get("best")
        if best is not None and ckpt.read_best(self.best_dir) == best:
            self.best = best
        elif self.cfg.keep_best and self.dist.is_main:
            # best/ was written after this checkpoint, by the run being resumed, or is missing: the
            # selection starts again from here rather than point at weights that do not match its record.
            shutil.rmtree(self.best_dir, ignore_errors=True)
        self.sampler.load_state_dict(state["sampler"])
        if self.dist.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(
                self.model, self.optimizer, tensors["optimizer"], options=StateDictOptions(full_state_dict=True)
            )
        else:
            self.optimizer.load_state_dict(tensors["optimizer"])
        self.scheduler.load_state_dict(tensors["scheduler"])
        if self.scaler and tensors.get("scaler"):
            self.scaler.load_state_dict(tensors["scaler"])
        ckpt.set_rng_state(tensors["rng"])

    # ---- batches ----------------------------------------------------------------------------------------

    def _collate(self, indices: list[int], epoch: int, dataset) -> dict:
        cfg, tok = self.cfg, self.tokenizer
        if cfg.objective == "classify":
            ex = [dataset[i] for i in indices]
            pad = tok.pad_token_id if tok.pad_token_id is not None else (self.model.config.pad_token_id or 0)
            ids, mask = D.pad_batch([e.ids for e in ex], pad)
            batch = {"input_ids": ids, "labels": torch.tensor([e.label for e in ex])}
            if not bool(mask.all()):
                batch["attention_mask"] = mask
            n_tokens = int(mask.sum())
        elif cfg.objective == "mlm":
            pairs = [
                D.mask_tokens(
                    dataset[i],
                    tok.mask_token_id,
                    tok.vocab_size,
                    tok.special_ids(),
                    D.sample_generator(cfg.seed, epoch, i),
                    cfg.mlm_probability,
                )
                for i in indices
            ]
            batch = {"input_ids": torch.stack([p[0] for p in pairs]), "labels": torch.stack([p[1] for p in pairs])}
            n_tokens = batch["input_ids"].numel()
        elif cfg.objective == "seq2seq":
            batch, n_tokens = self._denoising_batch(indices, epoch, dataset)
        else:
            ids = torch.stack([dataset[i] for i in indices])
            batch = {"input_ids": ids, "labels": ids}
            n_tokens = ids.numel()
        n_targets = self._check_batch(batch)
        # What the model would otherwise find by reading device values, computed here on the host.
        layout = PaddingLayout.from_mask(batch["attention_mask"]) if "attention_mask" in batch else None
        if cfg.objective == "mlm":
            batch["label_index"] = (batch["labels"] != -100).flatten().nonzero().squeeze(1)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        if layout is not None:
            batch["layout"] = layout.to(self.device)
        batch["n_tokens"] = n_tokens
        batch["n_targets"] = n_targets
        return batch

    def _denoising_batch(self, indices: list[int], epoch: int, dataset) -> tuple[dict, int]:
        """Noised sources (right-padded) and the blocks to write back: labels = block + </s>, decoder input =
        labels shifted right behind decoder_start_token_id. The noise of sample i is a function of
        (seed, epoch, i) only, like MLM masking."""
        cfg, tok = self.cfg, self.tokenizer
        eos = torch.tensor([tok.eos_token_id])
        blocks = [dataset[i] for i in indices]
        sources = [
            D.denoising_source(
                b,
                tok.mask_token_id,
                tok.eos_token_id,
                D.sample_generator(cfg.seed, epoch, i),
                cfg.noise_density,
                cfg.mean_span_length,
                self.sentence_ends,
            )
            for b, i in zip(blocks, indices)
        ]
        ids, mask = D.pad_batch(sources, tok.pad_token_id)
        labels = torch.stack([torch.cat([b, eos]) for b in blocks])
        start = torch.full((len(blocks), 1), self.model.config.decoder_start_token_id)
        batch = {"input_ids": ids, "labels": labels, "decoder_input_ids": torch.cat([start, labels[:, :-1]], 1)}
        if not bool(mask.all()):
            batch["attention_mask"] = mask
        return batch, int(mask.sum()) + labels.numel()

    def _check_batch(self, batch: dict) -> int:
        """Checks a batch's values on the host, before it moves to the device, and counts its targets:
        the training step itself then reads nothing back (ops/checks.py)."""
        ids, labels = batch["input_ids"], batch["labels"]
        vocab = self.model.config.vocab_size
        lo, hi = (int(v) for v in torch.aminmax(ids))
        if lo < 0 or hi >= vocab:
            raise ValueError(
                f"training data: token id {lo if lo < 0 else hi} is outside the model's vocabulary "
                f"of {vocab} (does the tokenizer match the model?)"
            )
        if self.cfg.objective == "classify":
            n_labels = self.model.config.num_labels
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_labels):
                raise ValueError(f"training data: class labels must lie in [0, {n_labels})")
            return labels.numel()
        real = labels != -100
        if bool(((labels < 0) & real).any()) or bool((labels >= vocab).any()):
            raise ValueError(f"training data: labels must be token ids in [0, {vocab}) or -100")
        return int(real[:, 1:].sum()) if self.cfg.objective == "clm" else int(real.sum())

    def _autocast(self):
        if self.cfg.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _loss(self, module, batch: dict):
        """(mean loss, targets counted, output) of one micro-batch."""
        keys = ("input_ids", "attention_mask", "labels", "layout", "label_index", "decoder_input_ids")
        inputs = {k: v for k, v in batch.items() if k in keys}
        # The batch was checked on the host in _collate: the forward and backward read no device values.
        with self._autocast(), checks.trusted():
            out = module(**inputs)
        return out.loss, batch["n_targets"], out

    # ---- the step -----------------------------------------------------------------------------------------

    def train_step(self) -> dict:
        cfg = self.cfg
        self.forward_module.train()
        epoch, indices = self.sampler.next_batch()
        micro = D.rank_slices(indices, cfg.batch_size, cfg.grad_accum, self.dist.rank, self.dist.world_size)
        loss_sum, tokens = 0.0, 0
        for j, mb in enumerate(micro):
            batch = self._collate(mb, epoch, self.train_set)
            last = j == len(micro) - 1
            with self._no_sync(not last), checks.trusted():
                loss, _, _ = self._loss(self.forward_module, batch)
                scaled = loss / cfg.grad_accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum = loss_sum + loss.detach().float()  # on the device: read once, after the step
            tokens += batch["n_tokens"]
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.wrapped.parameters(), cfg.clip_grad if cfg.clip_grad > 0 else float("inf")
        )
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        gn = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        # The step's one read of device values, after the optimizer: the loss and the gradient norm.
        loss_mean, gn = torch.stack([loss_sum / len(micro), gn.detach().float()]).tolist()
        (loss,) = dist_utils.all_reduce_mean([loss_mean], self.dist, self.device)
        tokens_all = tokens * self.dist.world_size
        self.tokens_seen += tokens_all
        return {
            "step": self.step,
            "split": "train",
            "loss": loss,
            "ppl": perplexity(loss),
            "lr": lr,
            "grad_norm": gn,
            "tokens": self.tokens_seen,
            "epoch": epoch,
            "_step_tokens": tokens_all,
        }

    def _no_sync(self, skip_sync: bool):
        """Gradient accumulation: only the last micro-batch all-reduces gradients."""
        if not skip_sync or not self.dist.enabled:
            return contextlib.nullcontext()
        if self.dist.mode == "ddp":
            return self.wrapped.no_sync()
        return _fsdp_no_sync(self.wrapped)

    # ---- evaluation -----------------------------------------------------------------------------------

    def _eval_order(self, n: int, cap_batches: int) -> list[int]:
        """The examples an eval scores: for classification a seeded shuffle, so a capped eval still covers
        every held-out play and class; capped at cap_batches global batches, so the same sequences are
        evaluated whatever the process count."""
        order = list(range(n))
        if self.cfg.objective == "classify":
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed + 1)).tolist()
        if cap_batches:
            order = order[: cap_batches * self.cfg.batch_size * self.dist.world_size]
        return order

    @torch.no_grad()
    def evaluate(self, split: str = "eval") -> dict:
        """Score the eval split (held out), or with split="val" the validation split keep_best selects on."""
        dataset = self.val_set if split == "val" else self.eval_set
        if dataset is None:
            return {}
        cfg = self.cfg
        self.forward_module.eval()
        order = self._eval_order(len(dataset), cfg.val_batches if split == "val" else cfg.eval_batches)
        batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        mine = batches[self.dist.rank :: self.dist.world_size]
        loss_sum = torch.zeros(2, dtype=torch.float64, device=self.device)  # (sum of loss * targets, targets)
        preds, labels = [], []
        with ops_backend(cfg.backend):
            for idx in mine:
                batch = self._collate(idx, EVAL_EPOCH, dataset)
                loss, count, out = self._loss(self.net, batch)
                loss_sum += torch.tensor([loss.double().item() * count, count], device=self.device, dtype=torch.float64)
                if cfg.objective == "classify":
                    preds.append(out.logits.argmax(-1))
                    labels.append(batch["labels"])
        loss_sum = dist_utils.all_reduce_sum(loss_sum, self.dist)
        loss = (loss_sum[0] / loss_sum[1].clamp_min(1)).item()
        rec = {"step": self.step, "split": split, "loss": loss, "ppl": perplexity(loss)}
        if cfg.objective == "classify":
            p = dist_utils.all_gather_cat(
                torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=self.device), self.dist
            )
            y = dist_utils.all_gather_cat(
                torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=self.device), self.dist
            )
            rec.update(classification_scores(p.cpu(), y.cpu(), self.num_labels), n_examples=int(y.numel()))
            rec.pop("ppl")
        self.forward_module.train()
        if split == "eval":
            self.last_eval = rec
        return rec

    def _validate(self) -> None:
        """keep_best: score the validation split; weights that beat the best so far replace best_dir."""
        rec = self.evaluate("val")
        self.logger.log(rec)
        metric, value = self.cfg.keep_best, rec[self.cfg.keep_best]
        if self.best is not None:
            better = value < self.best["value"] if metric == "loss" else value > self.best["value"]
            if not better:  # ties keep the earlier step
                return
        self.best = {"step": self.step, "metric": metric, "value": value, "val": rec}
        from plm_engine.models import save_pretrained

        plain = self._gathered_model()  # every process takes part under FSDP
        if self.dist.is_main:
            ckpt.save_best(self.best_dir, lambda d: save_pretrained(plain, d), self.tokenizer, self.best)
        dist_utils.barrier(self.dist)

    def _load_best(self) -> None:
        """Put the weights of best_dir into the model (every process reads them)."""
        from plm_engine.models import load_model

        state = load_model(self.best_dir, dtype=torch.float32, device="cpu").state_dict()
        if self.dist.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))
        else:
            self.model.load_state_dict(state, strict=True)

    # ---- the run ------------------------------------------------------------------------------------

    def _signal_handler(self, signum, frame):
        self._stop_signal = signum

    def run(self, stop_at: int | None = None) -> dict:
        """Train to max_steps (from the resumed step), evaluating, logging and checkpointing on the way.

        stop_at: end (with a checkpoint) at this step instead, keeping the schedule of max_steps, so a
        later resume continues the same run. SIGINT / SIGTERM finish the current step, write a checkpoint
        and return with summary["interrupted"] set to the signal number."""
        cfg = self.cfg
        end = min(cfg.max_steps, stop_at) if stop_at is not None else cfg.max_steps
        old_handlers = {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                old_handlers[s] = signal.signal(s, self._signal_handler)
        bar = None
        if cfg.progress and self.dist.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"train {cfg.objective}", dynamic_ncols=True)
        t_start = t_last = time.perf_counter()
        tok_last, interrupted = 0, None
        try:
            with ops_backend(cfg.backend):
                if cfg.keep_best and self.probed and self.step == 0:
                    # LP-FT: the probed head on the frozen model is a candidate too, so the fine-tune's
                    # weights reach the held-out plays only if they beat it on validation.
                    self._validate()
                while self.step < end:
                    rec = self.train_step()
                    tok_last += rec.pop("_step_tokens")
                    if self.step % cfg.log_every == 0 or self.step == end:
                        if self.device.type == "cuda":
                            torch.cuda.synchronize(self.device)
                        now = time.perf_counter()
                        rec["tokens_per_s"] = tok_last / max(now - t_last, 1e-9)
                        rec["mfu"] = (
                            rec["tokens_per_s"] * self.flops_per_token / (self._peak_flops() * self.dist.world_size)
                        )
                        rec["elapsed_s"] = now - t_start
                        t_last, tok_last = now, 0
                        self.logger.log(rec)
                        if bar is not None:
                            bar.set_postfix(
                                loss=f"{rec['loss']:.4f}",
                                lr=f"{rec['lr']:.2e}",
                                tok_s=f"{rec['tokens_per_s']:.0f}",
                                refresh=False,
                            )
                    if bar is not None:
                        bar.update(1)
                    if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < end:
                        if cfg.keep_best:
                            self._validate()
                        else:
                            self.logger.log(self.evaluate())
                        t_last = time.perf_counter()  # eval time is not training throughput
                    stop = dist_utils.broadcast_flag(self._stop_signal is not None, self.dist, self.device)
                    if stop:
                        interrupted = self._stop_signal or signal.SIGTERM
                        break
                    if cfg.save_every and self.step % cfg.save_every == 0 and self.step < end:
                        self.save()
            done = interrupted is None and self.step == cfg.max_steps
            if cfg.keep_best:
                # The last step is a candidate when the uninterrupted run would validate it too.
                validated = self.best is not None and self.best["step"] == self.step
                if interrupted is None and (self.step % cfg.eval_every == 0 or done) and not validated:
                    self._validate()
            elif interrupted is None:
                self.logger.log(self.evaluate())
            path = self.save()
            if cfg.keep_best and done:
                # The held-out plays score the selected weights only, once: no choice looks at them.
                self._load_best()
                final_eval = self.evaluate()
                final_eval.update(step=self.best["step"], selected_by=f"val {cfg.keep_best}")
                self.logger.log(final_eval)
        finally:
            if bar is not None:
                bar.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
        summary = {
            "step": self.step,
            "checkpoint": path,
            "eval": self.last_eval,
            "params": self.n_params,
            "tokens_seen": self.tokens_seen,
            "interrupted": int(interrupted) if interrupted else None,
            "log": self.logger.jsonl,
        }
        if cfg.keep_best and self.best is not None:
            summary["best"] = {**self.best, "path": self.best_dir}
        if cfg.objective == "classify" and cfg.baselines and interrupted is None and self.dist.is_main:
            summary["baselines"] = self.baselines()
            if self.last_eval:
                summary["margin"] = baseline_margin(self.last_eval, summary["baselines"], "bow_logreg")
        if cfg.objective == "seq2seq" and cfg.show_reconstructions and interrupted is None:
            model = self._gathered_model()  # every process takes part under FSDP
            if self.dist.is_main:
                summary["reconstructions"] = self.reconstructions(cfg.show_reconstructions, model)
        if self.dist.is_main:
            if cfg.plot and interrupted is None:
                try:
                    summary["plot"] = plot_log(self.logger.jsonl)
                except ImportError:  # matplotlib is optional
                    pass
            with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
        self.logger.close()
        return summary

    def baselines(self) -> dict:
        """Majority-class and bag-of-words logistic-regression scores on the same eval examples the model
        was scored on (the seeded eval subset when eval_batches caps it), fitted on every training
        passage, the validation split included."""
        from plm_engine.training.baselines import bow_logreg_baseline, majority_baseline

        order = self._eval_order(len(self.eval_texts), self.cfg.eval_batches)
        ex, ey = [self.eval_texts[i] for i in order], [self.eval_labels[i] for i in order]
        tx, ty = self.baseline_texts, self.baseline_labels
        return {
            "majority": majority_baseline(ty, ey, self.num_labels),
            "bow_logreg": bow_logreg_baseline(tx, ty, ex, ey, self.num_labels),
        }

    def _gathered_model(self):
        """The model with whole weights on the main process: the model itself, or under FSDP a plain copy
        built from the gathered state (a collective: every process calls it; None on the others)."""
        if self.dist.mode != "fsdp":
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from plm_engine.models import build_model

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=opts)
        if not self.dist.is_main:
            return None
        with meta_device():
            plain = build_model(self.model.config)
        plain.load_state_dict(state, assign=True)
        return plain

    @torch.no_grad()
    def reconstructions(self, n: int, model=None) -> list[dict]:
        """The first n eval blocks, noised as in evaluation, and what the model writes back (greedy):
        [{"noised", "reconstruction", "original"}] as text, <mask> shown where spans were masked."""
        model = self.model if model is None else model
        data = self.eval_set if self.eval_set is not None else self.train_set
        idx = list(range(min(n, len(data))))
        if not idx:
            return []
        batch = self._collate(idx, EVAL_EPOCH, data)
        dev = next(model.parameters()).device
        mask = batch.get("attention_mask")
        was_training = model.training
        model.eval()
        with ops_backend(self.cfg.backend):
            outs = model.generate_greedy(
                batch["input_ids"].to(dev), None if mask is None else mask.to(dev), max_new_tokens=self.cfg.seq_len + 8
            )
        model.train(was_training)
        tok, mask_id = self.tokenizer, self.tokenizer.mask_token_id
        recs = []
        for src, out, labels in zip(batch["input_ids"].tolist(), outs, batch["labels"].tolist()):
            pieces, cur = [], []
            for t in src:
                if t == mask_id:
                    pieces.append(tok.decode(cur))
                    cur = []
                else:
                    cur.append(t)
            pieces.append(tok.decode(cur))
            recs.append(
                {"noised": "<mask>".join(pieces), "reconstruction": tok.decode(out), "original": tok.decode(labels)}
            )
        return recs

    def _peak_flops(self) -> float:
        if self._peak is None:
            self._peak = peak_flops(self.device, self.cfg.precision)
        return self._peak

    def close(self) -> None:
        dist_utils.shutdown(self.dist)


def baseline_margin(model_scores: dict, baselines: dict, name: str) -> dict:
    """How far the model's accuracy and macro-F1 lie above baseline `name`'s (differences of fractions)."""
    return {
        "baseline": name,
        "accuracy": model_scores["accuracy"] - baselines[name]["accuracy"],
        "macro_f1": model_scores["macro_f1"] - baselines[name]["macro_f1"],
    }


def _dropped_blocks(base, config) -> tuple[str, ...]:
    """The state-dict prefixes of the checkpoint's blocks above a model config's smaller n_layers (none
    for encoder-decoder models, whose n_layers sizes two stacks)."""
    if base.is_encoder_decoder or config.is_encoder_decoder or config.n_layers >= base.n_layers:
        return ()
    return tuple(f"layers.{i}." for i in range(config.n_layers, base.n_layers))


def _blocks(model) -> list[torch.nn.Module]:
    """The transformer blocks (FSDP units, activation checkpointing): both stacks of an encoder-decoder."""
    return list(model.blocks) if hasattr(model, "blocks") else list(model.layers)


def _sentence_end_ids(tok) -> torch.Tensor:
    """The tokens whose text ends a line or a sentence (sentence permutation cuts after them)."""
    ends = [i for i in range(tok.vocab_size) if tok.decode([i]).rstrip(" ").endswith(("\n", ".", "!", "?"))]
    return torch.tensor(sorted(ends), dtype=torch.int64)


class _NoTokenizer:
    """Stands in for a tokenizer in the corpus key of a BPE cache (keyed by its settings)."""

    def __init__(self, tag: str):
        self.tag = tag

    def fingerprint(self) -> str:
        return self.tag


class Objective(torch.nn.Module):
    """The model behind the objective's entry point: forward() is model.classify() for classification and
    model.forward() otherwise (for seq2seq: the encoder-decoder's forward with decoder_input_ids). DDP, FSDP2 and torch.compile wrap this module, so their hooks see every
    call whichever head the objective uses."""

    def __init__(self, model, objective: str):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, **inputs):
        return self.model.classify(**inputs) if self.objective == "classify" else self.model(**inputs)


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
