"""Generation: a continuous-batching engine over the model's paged KV cache.

    from plm_engine.generation import Engine, SamplingParams
    outs = Engine("smollm2-135m").generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))

Nothing here is imported by plm_engine.models or below; the engine is the models' user.
"""

from plm_engine.generation.async_engine import AsyncEngine
from plm_engine.generation.engine import Engine, RequestOutput
from plm_engine.generation.sampler import SamplingParams

__all__ = ["AsyncEngine", "Engine", "RequestOutput", "SamplingParams"]
