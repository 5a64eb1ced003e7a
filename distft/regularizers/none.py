from distft.regularizers import REGULARIZERS
from distft.regularizers.base import Regularizer


@REGULARIZERS.register("none")
class NoRegularizer(Regularizer):
    """No penalty: the loss is the task's alone."""
