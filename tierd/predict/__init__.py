"""Access prediction and prefetching: the access log, the predictors, offline replay and traces.

Importing this package registers every predictor (each module registers itself with
``tierd.predict.base.register``) and is cheap: no scikit-learn, which ``learned`` imports only to
train.
"""

from tierd.predict import auto, learned, sequence  # noqa: F401  (imported to register themselves)
from tierd.predict.base import (
    DEFAULT_MIN_CONFIDENCE,
    NonePredictor,
    Predictor,
    make_predictor,
    predictor_names,
)
from tierd.predict.log import Access, AccessLog, from_row, read_trace, to_row, write_trace

#: every predictor ``make_predictor`` knows, in registration order
PREDICTOR_NAMES = predictor_names()

__all__ = [
    "DEFAULT_MIN_CONFIDENCE",
    "PREDICTOR_NAMES",
    "Access",
    "AccessLog",
    "NonePredictor",
    "Predictor",
    "from_row",
    "make_predictor",
    "predictor_names",
    "read_trace",
    "to_row",
    "write_trace",
]
