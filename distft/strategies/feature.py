from distft.errors import ConfigError
from distft.strategies.base import Strategy, register_strategy

CLASSIFIERS = ("logistic", "svm", "mlp")
POOLING = ("mean", "first", "last")


@register_strategy("feature")
class FeatureStrategy(Strategy):
    """The feature-based approach: the pretrained model stays frozen and only embeds; a
    scikit-learn classifier is fitted on the embeddings. Not a gradient loop, so it runs as
    its own recipe (distft/features.py), which this strategy names."""

    recipe = "feature"

    def check(self, task):
        cfg = self.cfg
        if task.predicts == "next_tokens":
            raise ConfigError(f"strategy=feature fits a classifier on embeddings: it needs task=classification or "
                              f"task=token_classification (task={task.name} predicts next tokens)")
        if task.own_heads:
            raise ConfigError(f"strategy=feature: task={task.name} brings its own trained heads; a classifier "
                              "on frozen features replaces them (use task.head=model, and one task per run)")
        if cfg.pooling not in POOLING:
            raise ConfigError(f"strategy.pooling={cfg.pooling!r}: choose one of {list(POOLING)}")
        if cfg.last_k < 1:
            raise ConfigError(f"strategy.last_k={cfg.last_k}: the mean of the last k >= 1 layers")
        if cfg.last_k > 1 and cfg.layer != -1:
            raise ConfigError(f"strategy.layer={cfg.layer} and strategy.last_k={cfg.last_k}: give one (a layer, "
                              "or the mean of the last k)")
        if cfg.batch_size < 1:
            raise ConfigError("strategy.batch_size must be >= 1")
        c = cfg.classifier
        if not c._target_ and c.name not in CLASSIFIERS:
            raise ConfigError(f"strategy.classifier.name={c.name!r}: choose one of {list(CLASSIFIERS)}, or give "
                              "strategy.classifier._target_ (any scikit-learn classifier class)")
        if c.cv < 2:
            raise ConfigError(f"strategy.classifier.cv={c.cv}: cross-validation needs >= 2 folds")

    def transform(self, model, task):
        raise ConfigError("strategy=feature runs as its own recipe (distft/features.py), not in the training loop")
