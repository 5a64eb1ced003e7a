from distft.errors import ConfigError
from distft.strategies.base import Strategy, freeze_all, register_strategy


@register_strategy("bitfit")
class BitFitStrategy(Strategy):
    """BitFit (Ben Zaken et al., 2022): only bias terms train, plus the task's heads."""

    def transform(self, model, task):
        freeze_all(model)
        n_bias = 0
        for name, p in model.named_parameters():
            if name.endswith(".bias") or name == "bias":
                p.requires_grad_(True)
                n_bias += 1
        if n_bias == 0:
            raise ConfigError(
                f"strategy=bitfit: {type(model).__name__} has no bias parameters to train "
                "(Llama-style models usually have none; for tiny_llama set "
                "model.from_config.attention_bias=true and mlp_bias=true)"
            )
        return model
