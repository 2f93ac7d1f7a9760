"""Training: causal-LM / masked-LM pretraining and classification fine-tuning on the fused kernels.

    from plm_engine.training import TrainConfig, Trainer
    summary = Trainer(TrainConfig.load("configs/shakespeare_gpt.toml")).run()

Modules: config (TrainConfig), data (corpora, token cache, packing, masking, sampler), shakespeare (the
demo corpus and its genre labels), schedule, checkpoint, metrics, distributed (DDP / FSDP2), trainer,
cli (`plm-engine train`, `plm-engine plot-log`). Importing this package loads neither models nor data.
"""

from plm_engine.training.config import TrainConfig


def __getattr__(name):
    if name == "Trainer":  # lazy: the trainer pulls in the model layer
        from plm_engine.training.trainer import Trainer

        return Trainer
    raise AttributeError(f"module 'plm_engine.training' has no attribute {name!r}")


__all__ = ["TrainConfig", "Trainer"]
