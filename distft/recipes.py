"""Recipes: what a run does from start to end, each of one shape.

    recipe = RECIPES.get(cfg.experiment.name)(cfg)   # run_recipe(cfg) does all four
    recipe.setup()
    summary = recipe.run()   # the run's summary, with its `objective`
    recipe.cleanup()

`single` is one gradient loop (distft/trainer.py); `sequential` runs stages one after
another, each handing the next its artifacts (distft/sequential.py). What is not a
gradient loop (feature extraction + scikit-learn, a search) is a recipe too.
"""
from __future__ import annotations

from typing import Dict, Optional

from distft.errors import ConfigError
from distft.registry import Registry


class Recipe:
    name = "base"

    def __init__(self, cfg):
        self.cfg = cfg

    def setup(self) -> "Recipe":
        return self

    def run(self) -> Dict:
        raise NotImplementedError

    def cleanup(self) -> None:
        pass


RECIPES: Registry[Recipe] = Registry("experiment")


@RECIPES.register("single")
class SingleRun(Recipe):
    """One training run: the loop of distft/trainer.py."""

    def setup(self):
        from distft.sweep import attach_trial
        from distft.trainer import Trainer

        self.trainer = Trainer(self.cfg, teardown=False).setup()
        attach_trial(self.trainer)  # a trial of distft-sweep: its evals go to the study's pruner
        return self

    def run(self):
        return self.trainer.train()

    def cleanup(self):
        self.trainer.close()


@RECIPES.register("sequential")
class SequentialRun(Recipe):
    """Stages one after another (experiment=sequential): each a single run on a mixture of
    every stage so far, starting from the artifacts of the one before."""

    trainer: Optional[object] = None

    def run(self):
        from distft.sequential import run_sequential

        return run_sequential(self.cfg, self)

    def cleanup(self):
        if self.trainer is not None:
            self.trainer.close()


def recipe_name(cfg) -> str:
    """The experiment's recipe, or the strategy's own when it is not a gradient loop
    (strategy=feature: embeddings + scikit-learn)."""
    import distft.features  # noqa: F401  (registers the feature recipe)
    import distft.strategies  # noqa: F401  (registers the built-in strategies)
    from distft.registry import import_plugins
    from distft.strategies.base import STRATEGIES

    import_plugins(cfg.plugins)  # a plugin's strategy may bring its own recipe
    own = getattr(STRATEGIES.get(cfg.strategy.name), "recipe", None)
    if own is None:
        return cfg.experiment.name
    if cfg.experiment.name != "single":
        raise ConfigError(f"strategy={cfg.strategy.name} runs as its own recipe and cannot be a stage of "
                          f"experiment={cfg.experiment.name}")
    return own


def run_recipe(cfg) -> Dict:
    """Build the recipe the config names and take it through its life cycle."""
    recipe = RECIPES.get(recipe_name(cfg))(cfg).setup()
    summary = recipe.run()
    recipe.cleanup()
    return summary
