"""Planning: exact storage costs, context memory, the Plan artifact and the planners that fill it.

Modules: ``cost`` (bytes per Linear and per model), ``context`` (image tokens, KV cache, activations),
``plan`` (``Plan``, ``apply_rules``), ``planners`` (the planners' pure math), ``make`` (``make_plan`` and the ``PLANNERS`` registry: uniform, luq, budget).
"""
