"""Each model's spec: its Config and `needs()` (what it reads), registered in MODELS by name.

They live apart from the models, torch free, because params validation, `vmr decode` (which asks
each model whether it reads frames) and `vmr dag` read every model's Config and needs; the model
class (`MODELS.get(name)`, imported on that call) inherits both from its spec.
"""
