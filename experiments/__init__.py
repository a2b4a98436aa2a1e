"""Experiments that use both libraries: the main job (pipeline), the ablation sweeps, the
throughput benchmark and its official-algorithm reference, with their shared run folders.

Import levels: tools -> experiments -> detection -> moco. Neither library imports this package.
"""
