"""tierd_integration: model hooks that serve a model's weights, KV cache and vision features from tierd.

This package is the import name of the ``model_integration/`` folder. It has no hooks yet; the
demo in ``examples/demo.py`` shows the mechanism they build on (weights bound as zero-copy views
with ``load_state_dict(assign=True)``).
"""
