"""plm_engine: fused kernels, a generator and a trainer for pretrained transformer language models.

Importing the package needs only torch: Triton and the compiled extension (plm_engine._C) are loaded
lazily by plm_engine.ops when a kernel first runs.
"""

__version__ = "0.1.0"

from plm_engine import ops  # noqa: E402
from plm_engine.generation import Engine, SamplingParams  # noqa: E402
from plm_engine.models import load_model, load_tokenizer  # noqa: E402

__all__ = ["Engine", "SamplingParams", "ops", "load_model", "load_tokenizer", "__version__"]
