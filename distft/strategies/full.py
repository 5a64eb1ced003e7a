from distft.strategies.base import Strategy, register_strategy


@register_strategy("full")
class FullStrategy(Strategy):
    """Every parameter trains."""

    def transform(self, model, task):
        for p in model.parameters():
            p.requires_grad_(True)
        return model
