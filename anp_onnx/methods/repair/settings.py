"""The repair stage's settings (torch-free: the batch planner reads them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

REPAIR_MODES = ("auto", "never", "always")


@dataclass(frozen=True)
class RepairSettings:
    """`mode`: auto repairs when pruning left the synthetic trigger above `max_asr` or stopped on the
    budget; `max_acc_drop`: the whole purification's clean-accuracy budget, judged on `holdout` of the
    clean data that repair does not train on."""

    mode: str = "auto"
    max_steps: int = 400
    batch_size: int = 128
    lr: float = 0.01  # SGD with momentum on the kept weights
    momentum: float = 0.9
    optimizer: str = "sgd"
    clip_norm: float = 1.0
    distill: bool = True  # every input, stamped or not, should get the output its clean version had
    stamped_share: float = 0.2  # of each batch stamped with a trigger
    check_every: int = 25  # held-out accuracy and the refitted triggers' ASR, every this many steps
    refit_steps: int = 40  # each check refits the triggers to the current model for this many steps
    patience: int = 2  # checks past the budget in a row before returning to the best checkpoint
    max_backtracks: int = 3
    max_asr: float = 0.03
    max_acc_drop: float = 0.03
    holdout: float = 0.2
    seed: int = 0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)
