"""Planning: exact storage costs, context memory, the Plan artifact and the planners that fill it.

Modules: ``cost`` (bytes per Linear and per model), ``context`` (image tokens, KV cache, activations),
``plan`` (``Plan``, ``apply_rules``), ``planners`` (``PLANNERS``: uniform, luq, budget).
"""
