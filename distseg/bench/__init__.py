"""Throughput benchmarks of the real training step (``bench train``), its scaling over processes, inference,
and reports of the recorded runs. ``python -m distseg.bench`` is the entry point launchers use."""
