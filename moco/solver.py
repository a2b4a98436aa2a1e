"""The pretraining solver: SGD as official, the official per-epoch LR schedule (step or cosine),
and the checks of the SOLVER keys.
"""

import math

from fvcore.common.param_scheduler import MultiStepParamScheduler

from moco.fast import sgd


def epoch_lr_factors(epochs, steps=(), gamma=0.1, cos=False):
    """Multiplier of the base LR for each epoch 0..epochs-1 (official main_moco.py formula)."""
    if cos:
        return [0.5 * (1.0 + math.cos(math.pi * e / epochs)) for e in range(epochs)]
    return [gamma ** sum(e >= s for s in steps) for e in range(epochs)]


class _EpochMultiStep(MultiStepParamScheduler):
    # fvcore adds 1e-6 to the training fraction before picking the epoch; with ~1e6 iterations
    # (200 ImageNet epochs) that moves each epoch boundary one iteration early. 1e-9 keeps float
    # rounding covered without shifting boundaries for any realistic iteration count.
    WHERE_EPSILON = 1e-9


def build_lr_multiplier(cfg):
    """fvcore ParamScheduler over the training fraction, constant within each epoch."""
    s = cfg.SOLVER
    factors = epoch_lr_factors(s.EPOCHS, tuple(s.STEPS), s.GAMMA, s.COS)
    milestones = [e for e in range(1, s.EPOCHS) if factors[e] != factors[e - 1]]
    values = [factors[0]] + [factors[e] for e in milestones]
    return _EpochMultiStep(values, num_updates=s.EPOCHS, milestones=milestones)


def validate_solver(cfg, world_size):
    """SOLVER.IMS_PER_BATCH, EPOCHS, START_EPOCH and LOG_PERIOD: the trainer's own settings."""
    s = cfg.SOLVER
    batch = s.IMS_PER_BATCH
    if batch < 1:
        raise ValueError(f"SOLVER.IMS_PER_BATCH (-b) must be >= 1, got {batch}")
    if batch % world_size:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH (-b) = {batch} is not divisible by the {world_size} "
            "processes; each process must get the same batch"
        )
    if s.EPOCHS < 1:
        raise ValueError(f"SOLVER.EPOCHS (--epochs) must be >= 1, got {s.EPOCHS}")
    for key in ("BASE_LR", "MOMENTUM", "WEIGHT_DECAY", "GAMMA"):
        # a NaN/inf LR trains NaN from the first step (and metrics.json would hold a bare NaN)
        if not math.isfinite(s[key]) or s[key] < 0:
            raise ValueError(f"SOLVER.{key} must be a finite number >= 0, got {s[key]}")
    if not 0 <= s.START_EPOCH < s.EPOCHS:
        raise ValueError(
            f"SOLVER.START_EPOCH (--start-epoch) {s.START_EPOCH} must be in [0, {s.EPOCHS})"
        )
    if cfg.LOG_PERIOD < 1:
        raise ValueError(f"LOG_PERIOD (-p) must be >= 1, got {cfg.LOG_PERIOD}")


def build_optimizer(cfg, model):
    """SGD over all parameters, as official (encoder_k's have no gradient and are skipped), so the
    optimizer state's parameter indices are those of official checkpoints."""
    device = next(model.parameters()).device
    return sgd(
        model.parameters(),
        cfg.SOLVER.BASE_LR,
        cfg.SOLVER.MOMENTUM,
        cfg.SOLVER.WEIGHT_DECAY,
        device,
        fused=cfg.SOLVER.FUSED_SGD,
    )
