"""Scripts run by each engine's own Python (see quantlab/eval/engines.py); they never import quantlab."""
