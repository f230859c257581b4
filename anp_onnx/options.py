"""Every purify option declared once: name, type, bounds, default, help, `--help` section, which methods
use it (and where it goes in their settings), command-line flags and hidden old names. `purify` and
`batch` build their click options from these (`anp_onnx.cli.options`), the manifest checks its keys and
values against them, and `method_settings` turns given values into a method's settings dataclass.
Torch-free: the batch planner reads it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from anp_onnx.errors import AnpError
from anp_onnx.methods.registry import get_method
from anp_onnx.methods.repair.settings import REPAIR_MODES

CLI_METHODS = ("trigger", "anp")  # what --method and a manifest's `method` offer (registry.METHODS has more)
INPUT_OUTPUT, EVALUATION, METHOD, ANP_ONLY, ANP_AMOUNT, POLICY = (
    "Input and output",
    "Evaluation",
    "Method",
    "ANP-only options (--method anp)",
    "ANP pruning amount (--method anp; one of)",
    "Policy (exit code 1 when broken)",
)
SECTIONS = (INPUT_OUTPUT, EVALUATION, METHOD, ANP_ONLY, ANP_AMOUNT, POLICY)


@dataclass(frozen=True)
class Option:
    """One option. `name` is the manifest's key and the click parameter's; `fields` maps each method that
    uses it to the field of that method's settings it sets ("optimisation.iterations"); empty `fields`:
    the pipeline's own (every method's). `flags` on the command line (a bool: "--x/--no-x"),
    `command_flags` where one command spells it otherwise, `aliases` hidden old flags that still work."""

    name: str
    kind: type
    default: object
    help: str
    section: str
    fields: Mapping[str, str] = field(default_factory=dict)
    flags: tuple[str, ...] = ()
    command_flags: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    metavar: str | None = None

    @property
    def methods(self) -> tuple[str, ...] | None:
        """The methods that read it; None: every method."""
        return tuple(self.fields) or None

    def flags_for(self, command: str) -> tuple[str, ...]:
        return self.command_flags.get(command, self.flags or (f"--{self.name.replace('_', '-')}",))

    def flag(self, command: str = "purify") -> str:
        """How a message names it on the command line: its first flag (the "--x" of "--x/--no-x")."""
        return self.flags_for(command)[0].split("/")[0]

    def problem(self, value: object) -> str | None:
        """Why `value` does not fit (type, bounds, choices), or None."""
        kind = self.kind
        if kind is Path:
            return None if isinstance(value, str | Path) else f"must be a path, got {value!r}"
        fits = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            fits = True
        if not fits:
            return f"must be {kind.__name__}, got {value!r}"
        if self.choices is not None and value not in self.choices:
            return f"must be one of {', '.join(self.choices)}, got {value!r}"
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above:
            low = "-inf" if self.low is None else f"{self.low:g}"
            high = "inf" if self.high is None else f"{self.high:g}"
            opening, closing = "(" if self.low_open else "", ")" if self.high_open else ""
            return f"must lie in {opening}{low}..{high}{closing}, got {value!r}"
        return None


def _anp(path: str) -> dict[str, str]:
    return {"anp": path}


PATHS = (
    Option("data", Path, None, "Clean labelled samples (.npz x/y).", INPUT_OUTPUT),
    Option("test_data", Path, None, "Clean test samples for ACC.", EVALUATION),
    Option("poison_data", Path, None, "Triggered samples labelled with the target, for ASR.", EVALUATION),
)
SETTINGS = (
    Option(
        "method",
        str,
        "trigger",
        "What decides the pruning: trigger (ANP's perturbation names the target, a synthesised trigger guides "
        "pruning within --max-acc-drop) or anp (the paper's masks, with --threshold/--prune-*).",
        METHOD,
        choices=CLI_METHODS,
    ),
    Option(
        "eps",
        float,
        0.4,
        "Neuron perturbation budget (anp: the min-max's; trigger: the target search's).",
        METHOD,
        {"anp": "optimisation.eps", "trigger": "eps"},
        low=0,
    ),
    Option(
        "neuron_mode",
        str,
        "batchnorm",
        "Layers without BatchNorm: re-create it while optimising (batchnorm) or perturb around the bias.",
        METHOD,
        {"anp": "optimisation.neuron_mode", "trigger": "neuron_mode"},
        choices=("batchnorm", "bias"),
    ),
    Option(
        "prune_max_acc_drop",
        float,
        None,
        "Clean-accuracy budget of the pruning (0.02 = 2 points): with trigger, how much pruning may cost on "
        "--data [0.03]; with anp, prune the most neurons whose accuracy on held-out clean data drops by at most "
        "this (instead of a threshold).",
        METHOD,
        {"anp": "pruning.max_acc_drop", "trigger": "max_acc_drop"},
        command_flags={"purify": ("--max-acc-drop",), "batch": ("--prune-max-acc-drop",)},
        low=0,
        high=1,
    ),
    Option("seed", int, 0, "Seed of every random choice.", METHOD, {"anp": "optimisation.seed", "trigger": "seed"}),
    Option(
        "repair",
        str,
        "auto",
        "Change kept weights when pruning leaves the backdoor (auto: when the synthetic trigger still works after "
        "pruning or pruning stopped on the budget).",
        METHOD,
        {"trigger": "repair.mode"},
        choices=REPAIR_MODES,
    ),
    Option(
        "effort",
        float,
        1.0,
        "Every step count of the trigger method (label search, triggers, unlearning, repair) times this: 0.1 is "
        "about ten times faster and less thorough, for large models on a CPU.",
        METHOD,
        {"trigger": "effort"},
        low=0,
        low_open=True,
    ),
    Option("iterations", int, 2000, "Mask optimisation iterations.", ANP_ONLY, _anp("optimisation.iterations"), low=0),
    Option("batch_size", int, 128, "Samples per iteration.", ANP_ONLY, _anp("optimisation.batch_size"), low=1),
    Option("alpha", float, 0.2, "Weight of the clean loss.", ANP_ONLY, _anp("optimisation.alpha"), low=0, high=1),
    Option(
        "mask_lr",
        float,
        0.2,
        "Learning rate of the masks.",
        ANP_ONLY,
        _anp("optimisation.mask_lr"),
        low=0,
        low_open=True,
    ),
    Option(
        "augment",
        bool,
        True,
        "Random crop and flip, as the paper.",
        ANP_ONLY,
        _anp("optimisation.augment"),
        flags=("--augment/--no-augment",),
    ),
    Option(
        "mask_average",
        bool,
        False,
        "Rank neurons by each mask's mean over the run (after 10% burn-in) rather than its last value.",
        ANP_ONLY,
        _anp("optimisation.average_masks"),
        flags=("--mask-average/--no-mask-average",),
    ),
    Option(
        "early_stop",
        bool,
        True,
        "Stop once the neurons to prune have not changed for 300 iterations (checked every 100).",
        ANP_ONLY,
        _anp("early_stop"),
        flags=("--early-stop/--no-early-stop",),
    ),
    Option(
        "threshold", float, None, "Prune masks below this [0.2].", ANP_AMOUNT, _anp("pruning.threshold"), low=0, high=1
    ),
    Option(
        "prune_fraction",
        float,
        None,
        "Prune this share of neurons, smallest masks first.",
        ANP_AMOUNT,
        _anp("pruning.fraction"),
        low=0,
        high=1,
    ),
    Option(
        "prune_count",
        int,
        None,
        "Prune this many neurons, smallest masks first.",
        ANP_AMOUNT,
        _anp("pruning.count"),
        low=0,
    ),
    Option(
        "holdout",
        float,
        0.2,
        "Share of --data held out from the optimisation for the accuracy budget (anp with --max-acc-drop).",
        ANP_AMOUNT,
        _anp("pruning.holdout"),
        low=0,
        high=1,
        low_open=True,
        high_open=True,
    ),
    Option(
        "class_output",
        str,
        None,
        "The graph output holding the classes [the first output].",
        EVALUATION,
        metavar="NAME",
    ),
)
DEVICE = Option(
    "device",
    str,
    "auto",
    "Where to optimise and evaluate: CUDA when available with auto.",
    EVALUATION,
    choices=("auto", "cpu", "cuda"),
)
POLICY_OPTIONS = (
    Option(
        "policy_max_acc_drop",
        float,
        None,
        "Test ACC may drop by at most this (0.02 = 2 points). Needs test data.",
        POLICY,
        aliases=("--max-acc-drop",),
        low=0,
        high=1,
    ),
    Option(
        "policy_max_asr",
        float,
        None,
        "ASR after purification at most this (0.1 = 10%), where poison data gives one.",
        POLICY,
        aliases=("--max-asr",),
        low=0,
        high=1,
    ),
)
PRUNING_AMOUNT = ("threshold", "prune_fraction", "prune_count", "prune_max_acc_drop")  # one of these at most
BY_NAME: dict[str, Option] = {option.name: option for option in (*PATHS, *SETTINGS, DEVICE, *POLICY_OPTIONS)}


def setting(name: str) -> Option:
    return BY_NAME[name]


def foreign_options(method: str, names: Iterable[str]) -> list[str]:
    """Of the settings `names`, those `method` does not use (in declaration order)."""
    given = set(names)
    return [
        option.name
        for option in SETTINGS
        if option.name in given and option.methods is not None and method not in option.methods
    ]


def refuse_foreign(method: str, names: Iterable[str], spelled: Mapping[str, str] | None = None) -> None:
    """AnpError naming the first of `names` that `method` does not use; `spelled[name]`: how the user wrote it."""
    foreign = foreign_options(method, names)
    if foreign:
        name = foreign[0]
        written = (spelled or {}).get(name, setting(name).flag())
        users = " or ".join(f"--method {user}" for user in setting(name).methods)
        raise AnpError(f"{written} is not used by --method {method}: leave it out, or use it with {users}")


def refuse_two_amounts(values: Mapping[str, object], spelled: Mapping[str, str] | None = None) -> None:
    """At most one pruning amount: a threshold, a fraction, a count or an accuracy budget."""
    chosen = [name for name in PRUNING_AMOUNT if values.get(name) is not None]
    if len(chosen) > 1:
        spell = lambda name: (spelled or {}).get(name, setting(name).flag())  # noqa: E731
        names, got = ", ".join(map(spell, PRUNING_AMOUNT)), ", ".join(map(spell, chosen))
        raise AnpError(f"choose one of {names}; got {got}")


def method_settings(method: str, values: Mapping[str, object]) -> object:
    """The settings dataclass of `method` from option values (name -> value; None or absent: the default).
    Values of options `method` does not use are left out (`refuse_foreign` says so where that matters)."""
    settings = get_method(method).default_settings()
    for option in SETTINGS:
        value = values.get(option.name)
        if value is not None and method in option.fields:
            settings = _replaced(settings, option.fields[method].split("."), value)
    return settings


def _replaced(settings: object, path: list[str], value: object) -> object:
    head, *rest = path
    inner = value if not rest else _replaced(getattr(settings, head), rest, value)
    return dataclasses.replace(settings, **{head: inner})
