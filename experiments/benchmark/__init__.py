"""The throughput benchmark: moco-det's step side by side with the official algorithm\n(:mod:`experiments.benchmark.official`), data loading, start-up to the first batch, Detectron2 iterations."""

from moco.utils.lazy import lazy_exports

_EXPORTS = {
    "BenchConfig": "config",
    "GROUPS": "config",
    "run_benchmark": "runner",
    "format_table": "runner",
    "write_json": "runner",
    "OfficialMoCo": "official",
    "official_train_step": "official",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
