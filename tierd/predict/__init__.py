"""Access prediction and prefetching: the access log, the predictors, offline replay and traces.

Importing this package is cheap (no scikit-learn): ``learned`` imports it only to train.
"""

from tierd.predict.base import PREDICTOR_NAMES, NonePredictor, Predictor, make_predictor
from tierd.predict.log import Access, AccessLog, from_row, read_trace, to_row, write_trace

__all__ = [
    "PREDICTOR_NAMES",
    "Access",
    "AccessLog",
    "NonePredictor",
    "Predictor",
    "from_row",
    "make_predictor",
    "read_trace",
    "to_row",
    "write_trace",
]
