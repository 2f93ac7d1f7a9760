"""One config dataclass for every supported architecture, with named presets and HF config.json mapping.

Three families share one Transformer (plm_engine.models.transformer):
  gpt2   learned positions, pre-norm LayerNorm, GELU(tanh) MLP, biases everywhere, tied LM head
  bert   learned positions + token types, post-norm LayerNorm, GELU MLP, pooler, MLM / classifier heads
  llama  RoPE, pre-norm RMSNorm, SwiGLU MLP, GQA, optional q/k/v biases (Qwen2), tied or untied head
Two encoder-decoder families share one Seq2SeqTransformer (plm_engine.models.seq2seq):
  bart   BART, mBART and Marian: learned (offset 2) or sinusoidal positions, post-norm (BART, Marian) or
         pre-norm (mBART) LayerNorm, biases everywhere, shared or separate embeddings, final_logits_bias
  t5     relative position buckets, pre-norm RMSNorm without bias, ReLU or gated-GELU MLP, no biases
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from importlib import resources

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ARCHS = ("gpt2", "bert", "llama", "bart", "t5")
SEQ2SEQ_ARCHS = ("bart", "t5")
ACTIVATIONS = ("gelu_tanh", "gelu", "swiglu", "relu", "silu", "geglu")
# HF model_type -> our arch. Mistral and Qwen2 are Llama-shaped (Qwen2 adds q/k/v biases); mBART and Marian
# are BART-shaped.
HF_MODEL_TYPES = {
    "gpt2": "gpt2",
    "bert": "bert",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "bart": "bart",
    "mbart": "bart",
    "marian": "bart",
    "t5": "t5",
}


@dataclass
class ModelConfig:
    arch: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None  # None: same as n_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // n_heads
    intermediate_size: int | None = None  # None: 4 * hidden_size
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-5
    activation: str | None = None  # one of ACTIVATIONS (geglu: gelu_tanh(gate) * up); None: the arch's default
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF rope_scaling / rope_parameters minus rope_theta ("llama3", "linear")
    tie_word_embeddings: bool = True
    qkv_bias: bool | None = None  # None: the arch's default (gpt2/bert yes, llama no)
    out_bias: bool | None = None
    mlp_bias: bool | None = None
    type_vocab_size: int = 0  # bert token types
    pooler: bool = False  # bert pooler (dense + tanh over the first token)
    mlm_head: bool = False  # bert masked-LM head (transform + tied decoder)
    num_labels: int = 0  # > 0: a sequence-classification head
    # What the classification head reads: None = the arch's way (bert: the pooler over the first token,
    # causal: the last real token); "mean" = the mean over the real tokens, as sentence-transformers pool
    classifier_pooling: str | None = None
    dropout: float = 0.0  # residual/embedding dropout in training (attention dropout is not supported)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # the checkpoint's dtype, as in HF config.json
    # Encoder-decoder (bart, t5) only. n_layers, n_heads, intermediate_size describe both stacks.
    n_decoder_layers: int | None = None  # None: n_layers
    decoder_vocab_size: int | None = None  # the target vocabulary when not shared (Marian); None: vocab_size
    share_embeddings: bool = True  # encoder and decoder read one token embedding
    decoder_start_token_id: int | None = None
    positions: str | None = None  # "learned" (offset 2) | "sinusoidal" | "relative" (T5); None: the arch's
    pre_norm: bool | None = None  # None: the arch's (bart: post-norm, t5: pre-norm)
    embed_norm: bool | None = None  # a LayerNorm right after the embeddings (BART's layernorm_embedding)
    scale_embedding: bool = False  # token embeddings times sqrt(hidden_size)
    final_logits_bias: bool | None = None  # a (vocab,) bias on the logits; None: yes for bart
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    scale_decoder_outputs: bool = False  # T5: decoder output times hidden_size**-0.5 before a tied head
    extra: dict = field(default_factory=dict)  # other HF config keys, written back by to_hf()

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"ModelConfig: unknown arch {self.arch!r}; supported: {', '.join(ARCHS)}")
        default_bias = self.arch not in ("llama", "t5")
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.hidden_size // self.n_heads
        self.intermediate_size = self.intermediate_size or 4 * self.hidden_size
        self.activation = (
            self.activation
            or {"gpt2": "gelu_tanh", "bert": "gelu", "llama": "swiglu", "bart": "gelu", "t5": "relu"}[self.arch]
        )
        self.qkv_bias = default_bias if self.qkv_bias is None else self.qkv_bias
        self.out_bias = default_bias if self.out_bias is None else self.out_bias
        self.mlp_bias = default_bias if self.mlp_bias is None else self.mlp_bias
        for name in ("vocab_size", "hidden_size", "n_layers", "n_heads", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.classifier_pooling not in (None, "mean"):
            raise ValueError(f"ModelConfig: classifier_pooling must be None or 'mean', got {self.classifier_pooling!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"ModelConfig: unknown activation {self.activation!r}; supported: {', '.join(ACTIVATIONS)}"
            )
        if self.is_encoder_decoder:
            self._seq2seq_defaults()
        kind = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if kind not in ("default", "linear", "llama3"):
            raise ValueError(f"ModelConfig: unsupported RoPE scaling {kind!r} (supported: linear, llama3)")

    def _seq2seq_defaults(self) -> None:
        t5 = self.arch == "t5"
        self.n_decoder_layers = self.n_decoder_layers or self.n_layers
        self.decoder_vocab_size = self.decoder_vocab_size or self.vocab_size
        self.positions = self.positions or ("relative" if t5 else "learned")
        self.pre_norm = t5 if self.pre_norm is None else self.pre_norm
        # BART and mBART normalise the embeddings (layernorm_embedding); Marian and T5 do not.
        self.embed_norm = (not t5 and self.positions == "learned") if self.embed_norm is None else self.embed_norm
        self.final_logits_bias = (not t5) if self.final_logits_bias is None else self.final_logits_bias
        if self.n_kv_heads != self.n_heads:
            raise ValueError("ModelConfig: encoder-decoder models have no grouped-query attention (n_kv_heads)")
        if self.positions not in (("relative",) if t5 else ("learned", "sinusoidal")):
            raise ValueError(f"ModelConfig: arch {self.arch!r} does not support positions={self.positions!r}")
        if self.share_embeddings and self.decoder_vocab_size != self.vocab_size:
            raise ValueError("ModelConfig: shared embeddings need decoder_vocab_size == vocab_size")
        if self.n_decoder_layers < 1 or self.relative_attention_num_buckets < 2:
            raise ValueError("ModelConfig: n_decoder_layers must be >= 1 and relative_attention_num_buckets >= 2")

    @property
    def causal(self) -> bool:
        """A decoder-only causal language model (gpt2, llama)."""
        return self.arch in ("gpt2", "llama")

    @property
    def is_encoder_decoder(self) -> bool:
        return self.arch in SEQ2SEQ_ARCHS

    @property
    def lm_vocab_size(self) -> int:
        """The size of the LM head's output: the decoder's vocabulary for encoder-decoder models."""
        return self.decoder_vocab_size or self.vocab_size

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else list(e)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ---- presets ------------------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        """A named config: tiny test models and the shapes of the real checkpoints."""
        if name not in PRESETS:
            raise ValueError(f"ModelConfig.preset: unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], **overrides})

    # ---- HF config.json ---------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict) -> ModelConfig:
        """From a HF transformers config.json dict (GPT-2, BERT, Llama, Mistral, Qwen2)."""
        model_type = hf.get("model_type")
        if model_type not in HF_MODEL_TYPES:
            raise ValueError(
                f"unsupported architecture: model_type {model_type!r} "
                f"(architectures {hf.get('architectures')}); supported model types: "
                f"{', '.join(HF_MODEL_TYPES)}"
            )
        arch = HF_MODEL_TYPES[model_type]
        common = dict(
            arch=arch,
            vocab_size=hf["vocab_size"],
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "") or None,
            num_labels=_num_labels(hf),
            classifier_pooling="mean" if hf.get("classifier_pooling") == "mean" else None,
        )
        if arch in SEQ2SEQ_ARCHS:
            return cls(**common, **_seq2seq_from_hf(hf, model_type))
        if arch == "gpt2":
            act = hf.get("activation_function", "gelu_new")
            return cls(
                **common,
                hidden_size=hf["n_embd"],
                n_layers=hf["n_layer"],
                n_heads=hf["n_head"],
                intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"],
                max_position_embeddings=hf["n_positions"],
                norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                activation=_gelu_kind(act),
                tie_word_embeddings=hf.get("tie_word_embeddings", True),
                dropout=hf.get("resid_pdrop", 0.0) or 0.0,
            )
        if arch == "bert":
            if hf.get("position_embedding_type", "absolute") != "absolute":
                raise ValueError(f"unsupported BERT position_embedding_type {hf['position_embedding_type']!r}")
            archs = hf.get("architectures") or []
            return cls(
                **common,
                hidden_size=hf["hidden_size"],
                n_layers=hf["num_hidden_layers"],
                n_heads=hf["num_attention_heads"],
                intermediate_size=hf["intermediate_size"],
                max_position_embeddings=hf["max_position_embeddings"],
                norm_eps=hf.get("layer_norm_eps", 1e-12),
                activation=_gelu_kind(hf.get("hidden_act", "gelu")),
                type_vocab_size=hf.get("type_vocab_size", 2),
                pooler=True,
                mlm_head=any("MaskedLM" in a or "PreTraining" in a for a in archs),
                tie_word_embeddings=hf.get("tie_word_embeddings", True),
                dropout=hf.get("hidden_dropout_prob", 0.0) or 0.0,
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported Llama-family hidden_act {hf['hidden_act']!r} (only silu/SwiGLU)")
        rope = dict(hf.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or rope or None
        if scaling is not None:
            scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
            if scaling.get("rope_type", scaling.get("type")) in (None, "default"):
                scaling = None
        qkv_bias = hf.get("attention_bias", model_type == "qwen2")
        # Sliding-window attention is not implemented: within the window it equals full attention, so the
        # context is capped at the window instead of silently attending further back.
        window = hf.get("sliding_window") if hf.get("use_sliding_window", model_type == "mistral") else None
        max_pos = hf.get("max_position_embeddings", 2048)
        if window and window < max_pos:
            max_pos = window
        return cls(
            **common,
            hidden_size=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads"),
            head_dim=hf.get("head_dim"),
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=max_pos,
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            qkv_bias=qkv_bias,
            out_bias=hf.get("attention_bias", False) and model_type != "qwen2",
            mlp_bias=hf.get("mlp_bias", False),
            dropout=0.0,
            extra={"model_type": model_type},
        )

    def to_hf(self) -> dict:
        """A config.json dict that transformers loads back (LlamaConfig / GPT2Config / BertConfig)."""
        ids = {
            k: v
            for k, v in (
                ("bos_token_id", self.bos_token_id),
                ("eos_token_id", self.eos_token_id),
                ("pad_token_id", self.pad_token_id),
            )
            if v is not None
        }
        if self.torch_dtype:
            ids["torch_dtype"] = self.torch_dtype
        if self.num_labels:
            ids["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
            ids["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        if self.classifier_pooling:  # the key ModernBERT's config uses for the same choice
            ids["classifier_pooling"] = self.classifier_pooling
        gelu = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
        if self.is_encoder_decoder:
            return {"architectures": [self.hf_architecture()], **ids, **_seq2seq_to_hf(self)}
        # What every decoder-only and BERT config.json starts with; a Llama-shaped config keeps its own
        # model type (llama, mistral, qwen2).
        model_type = self.extra.get("model_type", "llama") if self.arch == "llama" else self.arch
        head = {
            "model_type": model_type,
            "architectures": [self.hf_architecture()],
            **ids,
            "vocab_size": self.vocab_size,
        }
        # The trunk's sizes under the family's HF names, written once for the three families.
        size_keys = _GPT2_SIZE_KEYS if self.arch == "gpt2" else _SIZE_KEYS
        sizes = dict(zip(size_keys, (self.hidden_size, self.n_layers, self.n_heads, self.intermediate_size)))
        if self.arch == "gpt2":
            return {
                **head,
                **sizes,
                "n_positions": self.max_position_embeddings,
                "layer_norm_epsilon": self.norm_eps,
                "activation_function": gelu[self.activation],
                "tie_word_embeddings": self.tie_word_embeddings,
                "resid_pdrop": self.dropout,
                "embd_pdrop": self.dropout,
                "attn_pdrop": 0.0,
            }
        if self.arch == "bert":
            return {
                **head,
                **sizes,
                "hidden_act": gelu[self.activation],
                "max_position_embeddings": self.max_position_embeddings,
                "layer_norm_eps": self.norm_eps,
                "type_vocab_size": self.type_vocab_size,
                "tie_word_embeddings": self.tie_word_embeddings,
                "hidden_dropout_prob": self.dropout,
                "attention_probs_dropout_prob": 0.0,
            }
        rope = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        if "type" in rope and "rope_type" not in (self.rope_scaling or {}):
            rope["rope_type"] = rope.pop("type")
        out = {
            **head,
            **sizes,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "rope_scaling": None if self.rope_scaling is None else rope,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        if model_type != "qwen2":
            out.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        return out

    def hf_architecture(self) -> str:
        if self.is_encoder_decoder:
            return _SEQ2SEQ_HF_CLASSES[self.extra.get("model_type", self.arch)]
        prefix = {"gpt2": "GPT2", "bert": "Bert"}.get(self.arch) or {
            "llama": "Llama",
            "mistral": "Mistral",
            "qwen2": "Qwen2",
        }[self.extra.get("model_type", "llama")]
        if self.num_labels:
            return prefix + "ForSequenceClassification"
        if self.arch == "bert":
            return "BertForMaskedLM" if self.mlm_head else "BertModel"
        return prefix + ("LMHeadModel" if self.arch == "gpt2" else "ForCausalLM")


def _gelu_kind(act: str) -> str:
    if act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return "gelu_tanh"
    if act == "gelu":
        return "gelu"
    raise ValueError(f"unsupported activation {act!r} (gelu, gelu_new, gelu_pytorch_tanh)")


# HF's names for the trunk's sizes (hidden, layers, heads, MLP width): GPT-2's own, and the ones BERT and
# the Llama family share.
_GPT2_SIZE_KEYS = ("n_embd", "n_layer", "n_head", "n_inner")
_SIZE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")

_SEQ2SEQ_HF_CLASSES = {
    "bart": "BartForConditionalGeneration",
    "mbart": "MBartForConditionalGeneration",
    "marian": "MarianMTModel",
    "t5": "T5ForConditionalGeneration",
}
# HF activation names of the BART family / T5's feed_forward_proj -> ours (and back).
_BART_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_BART_ACTS.update(swish="silu", silu="silu")
_T5_ACTS = {"relu": "relu", "gelu": "gelu", "gated-gelu": "geglu", "gated-silu": "swiglu"}
# Generation settings of BART-family configs that we keep so that a saved config round-trips.
_KEPT_KEYS = ("forced_bos_token_id", "forced_eos_token_id")


def _seq2seq_from_hf(hf: dict, model_type: str) -> dict:
    """ModelConfig fields (beyond the token ids) of a BART / mBART / Marian / T5 config.json."""
    kept = {k: hf[k] for k in _KEPT_KEYS if k in hf}
    if model_type == "t5":
        act = hf.get("feed_forward_proj", "relu")
        if act not in _T5_ACTS:
            raise ValueError(f"unsupported T5 feed_forward_proj {act!r} (supported: {', '.join(_T5_ACTS)})")
        # transformers 5 always ties T5's head to the shared embedding at init and rescales the decoder output
        # unless the config says otherwise; a checkpoint whose lm_head.weight differs is loaded untied
        # (models/seq2seq_hf.py decides from the tensors).
        tied = hf.get("tie_word_embeddings", True) is not False
        return dict(
            hidden_size=hf["d_model"],
            n_layers=hf["num_layers"],
            n_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
            n_heads=hf["num_heads"],
            head_dim=hf["d_kv"],
            intermediate_size=hf["d_ff"],
            max_position_embeddings=hf.get("n_positions", 512),
            norm_eps=hf.get("layer_norm_epsilon", 1e-6),
            activation=_T5_ACTS[act],
            tie_word_embeddings=tied,
            scale_decoder_outputs=hf.get("scale_decoder_outputs", tied),
            relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
            decoder_start_token_id=hf.get("decoder_start_token_id", hf.get("pad_token_id", 0)),
            dropout=hf.get("dropout_rate", 0.0) or 0.0,
            extra={"model_type": model_type, **kept},
        )
    heads, ffn = hf["encoder_attention_heads"], hf["encoder_ffn_dim"]
    if hf.get("decoder_attention_heads", heads) != heads or hf.get("decoder_ffn_dim", ffn) != ffn:
        raise ValueError(
            f"unsupported {model_type} config: the encoder and the decoder differ in attention heads or FFN size "
            f"({heads}/{hf.get('decoder_attention_heads')} heads, {ffn}/{hf.get('decoder_ffn_dim')} FFN)"
        )
    act = hf.get("activation_function", "gelu")
    if act not in _BART_ACTS:
        raise ValueError(f"unsupported {model_type} activation_function {act!r} (supported: {', '.join(_BART_ACTS)})")
    marian = model_type == "marian"
    tied = hf.get("tie_word_embeddings", True)
    return dict(
        hidden_size=hf["d_model"],
        n_layers=hf["encoder_layers"],
        n_decoder_layers=hf.get("decoder_layers") or hf["encoder_layers"],
        n_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=hf["max_position_embeddings"],
        norm_eps=1e-5,  # nn.LayerNorm's default: these configs have no epsilon
        activation=_BART_ACTS[act],
        tie_word_embeddings=tied,
        # BART ties everything to `shared` or nothing; Marian can keep separate source/target vocabularies.
        share_embeddings=hf.get("share_encoder_decoder_embeddings", True) if marian else tied,
        decoder_vocab_size=(hf.get("decoder_vocab_size") or hf["vocab_size"]) if marian else None,
        positions="sinusoidal" if marian else "learned",
        pre_norm=model_type == "mbart",
        embed_norm=not marian,
        scale_embedding=bool(hf.get("scale_embedding", False)),
        final_logits_bias=True,
        decoder_start_token_id=hf.get("decoder_start_token_id"),
        dropout=hf.get("dropout", 0.0) or 0.0,
        extra={"model_type": model_type, **kept},
    )


def _seq2seq_to_hf(c: ModelConfig) -> dict:
    model_type = c.extra.get("model_type", c.arch)
    kept = {k: c.extra[k] for k in _KEPT_KEYS if k in c.extra}
    out = {"model_type": model_type, "is_encoder_decoder": True, **kept}
    if c.decoder_start_token_id is not None:
        out["decoder_start_token_id"] = c.decoder_start_token_id
    if c.arch == "t5":
        return {
            **out,
            "vocab_size": c.vocab_size,
            "d_model": c.hidden_size,
            "d_kv": c.head_dim,
            "d_ff": c.intermediate_size,
            "num_layers": c.n_layers,
            "num_decoder_layers": c.n_decoder_layers,
            "num_heads": c.n_heads,
            "n_positions": c.max_position_embeddings,
            "relative_attention_num_buckets": c.relative_attention_num_buckets,
            "relative_attention_max_distance": c.relative_attention_max_distance,
            "layer_norm_epsilon": c.norm_eps,
            "feed_forward_proj": {v: k for k, v in _T5_ACTS.items()}[c.activation],
            "dropout_rate": c.dropout,
            "tie_word_embeddings": c.tie_word_embeddings,
            "scale_decoder_outputs": c.scale_decoder_outputs,
        }
    layout = (c.pre_norm, c.embed_norm, c.positions)
    if layout != (model_type == "mbart", model_type != "marian", "sinusoidal" if model_type == "marian" else "learned"):
        raise ValueError(
            f"to_hf: a {model_type} config with pre_norm, embed_norm, positions = {layout} has no "
            "transformers equivalent"
        )
    out.update(
        vocab_size=c.vocab_size,
        d_model=c.hidden_size,
        encoder_layers=c.n_layers,
        decoder_layers=c.n_decoder_layers,
        encoder_attention_heads=c.n_heads,
        decoder_attention_heads=c.n_heads,
        encoder_ffn_dim=c.intermediate_size,
        decoder_ffn_dim=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings,
        activation_function={"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "swish"}[c.activation],
        scale_embedding=c.scale_embedding,
        tie_word_embeddings=c.tie_word_embeddings,
        dropout=c.dropout,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )
    if model_type == "marian":
        out.update(decoder_vocab_size=c.decoder_vocab_size, share_encoder_decoder_embeddings=c.share_embeddings)
    return out


def _num_labels(hf: dict) -> int:
    if not any("SequenceClassification" in a for a in hf.get("architectures") or []):
        return 0
    return len(hf.get("id2label") or {}) or hf.get("num_labels", 2)


# The named configs (tiny test models, small CPU demo models, the shapes of real checkpoints) are data:
# presets.toml beside this file, one table per preset.
PRESETS: dict[str, dict] = tomllib.loads(resources.files(__package__).joinpath("presets.toml").read_text())
