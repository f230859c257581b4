"""Repair: change the kept weights so that the suspected target can no longer be reached by a trigger,
using the clean data alone (after Neural Cleanse's unlearning and the min-max of i-BAU/SAU).

    min_w  KL(f_0(x) || f_w(x)) + KL(f_0(x') || f_w(t(x'))),   t refitted to f_w

`f_0` is the model as given, `t` the synthesised triggers of the suspected target (patch, blend, or the
universal additive perturbation of `trigger/additive.py`): every input is taught the original model's output
on its unstamped version (with `distill` off, cross-entropy on its own label). Every `check_every` steps the
triggers are refitted to the current weights (the inner max: a backdoor that survives finds a trigger of the
same size again) and the held-out clean accuracy is measured; training stops as soon as the refitted
triggers' success is at most `max_asr` within the budget, and otherwise keeps the checkpoint with the lowest
success within the budget (accuracy dips as the triggers are first unlearned, then recovers: only
`patience` checks past the budget in a row return to the best checkpoint and halve the step size, and
`max_backtracks` such returns end the run). The model stays in eval mode: BatchNorm keeps its running
statistics, so what is trained is exactly what the ONNX file computes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from anp_onnx.bridge.importer import GatedClassifier
from anp_onnx.bridge.weights import WeightSlot, restore, snapshot, trainable_parameters, weight_slots
from anp_onnx.methods.repair.settings import RepairSettings
from anp_onnx.methods.trigger.additive import AdditiveTrigger, refine_additive
from anp_onnx.methods.trigger.synthesis import Trigger, hit_rate
from anp_onnx.prune import within_budget


@dataclass
class RepairCheck:
    step: int
    clean_accuracy: float
    residual_asr: float  # the refitted triggers' highest success on held-out inputs of other labels


@dataclass
class RepairResult:
    slots: list[WeightSlot]
    accuracy_reference: float  # held-out accuracy of the model as given (nothing pruned)
    checks: list[RepairCheck] = field(default_factory=list)
    steps_run: int = 0
    backtracks: int = 0  # checks past the budget, each followed by a return to the best checkpoint at half the step
    stopped_because: str = ""
    triggers: list[Trigger] = field(default_factory=list)  # refitted to the repaired weights
    chosen: RepairCheck | None = None  # the checkpoint kept: lowest residual ASR within the budget

    @property
    def residual_asr(self) -> float:
        return self.chosen.residual_asr if self.chosen else 1.0

    @property
    def clean_accuracy(self) -> float:
        return self.chosen.clean_accuracy if self.chosen else self.accuracy_reference

    def summary(self) -> dict[str, object]:
        return {
            "steps_run": self.steps_run,
            "backtracks": self.backtracks,
            "stopped_because": self.stopped_because,
            "held_out_accuracy_reference": round(self.accuracy_reference, 4),
            "held_out_accuracy": round(self.clean_accuracy, 4),
            "residual_asr": round(self.residual_asr, 4),
            "chosen_step": self.chosen.step if self.chosen else 0,
            "checks": [
                {
                    "step": check.step,
                    "clean_accuracy": round(check.clean_accuracy, 4),
                    "residual_asr": round(check.residual_asr, 4),
                }
                for check in self.checks
            ],
        }


def repair_weights(
    classifier: GatedClassifier,
    model,
    train: tuple[torch.Tensor, torch.Tensor],
    held_out: tuple[torch.Tensor, torch.Tensor],
    triggers: list[Trigger],
    target: int,
    settings: RepairSettings | None = None,
    on_step: Callable[[int], None] | None = None,
) -> RepairResult:
    """Train the classifier's kept weights (`bridge.weights.weight_slots`) in place; masks stay as they are."""
    settings = settings or RepairSettings()
    generator = torch.Generator(device=train[0].device).manual_seed(settings.seed)
    slots = weight_slots(classifier, model)
    parameters = trainable_parameters(classifier, slots)
    x, y = train
    held_x, held_y = held_out
    others = held_x[held_y != target]
    with _only_trainable(classifier, parameters):
        classifier.eval()
        result = RepairResult(slots, _accuracy_with_all_neurons(classifier, held_x, held_y))
        pool = [
            _AdditiveRefit(trigger) if isinstance(trigger, AdditiveTrigger) else _Refit(trigger) for trigger in triggers
        ]
        if settings.optimizer == "adam":
            optimizer = torch.optim.Adam(parameters, lr=settings.lr)
        else:
            optimizer = torch.optim.SGD(parameters, lr=settings.lr, momentum=settings.momentum)
        best = snapshot(parameters)

        def check(step: int) -> RepairCheck:
            for refit in pool:
                refit.fit(classifier, x[y != target], target, settings.refit_steps, generator)
            stamped = [refit.trigger.stamp(others) for refit in pool]
            labels = torch.full((len(others),), target, device=x.device)
            asr = max(hit_rate(classifier, batch, labels) for batch in stamped)
            return RepairCheck(step, hit_rate(classifier, held_x, held_y), asr)

        with torch.no_grad():
            reference = torch.cat(
                [F.softmax(classifier(x[start : start + 512]).float(), dim=1) for start in range(0, len(x), 512)]
            )
        best_check = check(0)
        result.checks.append(best_check)
        outside = 0  # checks past the budget in a row
        for step in range(1, settings.max_steps + 1):
            index = torch.randint(len(x), (settings.batch_size,), generator=generator, device=x.device)
            images, labels = _stamped_batch(x[index], y[index], target, pool, generator, settings.stamped_share)
            outputs = classifier(images).float()
            if settings.distill:
                loss = F.kl_div(F.log_softmax(outputs, dim=1), reference[index], reduction="batchmean")
            else:
                loss = classifier.loss(outputs, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward(inputs=parameters)
            if settings.clip_norm:
                torch.nn.utils.clip_grad_norm_(parameters, settings.clip_norm)
            optimizer.step()
            result.steps_run = step
            if on_step is not None:
                on_step(step)
            if step % settings.check_every and step != settings.max_steps:
                continue
            current = check(step)
            result.checks.append(current)
            within = within_budget(result.accuracy_reference - current.clean_accuracy, settings.max_acc_drop)
            outside = 0 if within else outside + 1
            if outside >= settings.patience:
                # past the budget `patience` checks running: back to the best checkpoint, with half the step size
                outside = 0
                restore(parameters, best)
                optimizer.state.clear()
                for group in optimizer.param_groups:
                    group["lr"] /= 2
                result.backtracks += 1
                if result.backtracks > settings.max_backtracks:
                    result.stopped_because = (
                        f"held-out accuracy left the budget {result.backtracks} times; kept the best checkpoint"
                    )
                    break
                continue
            if not within:
                continue
            if current.residual_asr < best_check.residual_asr:
                best, best_check = snapshot(parameters), current
            if current.residual_asr <= settings.max_asr:
                result.stopped_because = f"refitted trigger ASR {current.residual_asr:.3f} <= {settings.max_asr:g}"
                break
        else:
            result.stopped_because = f"{settings.max_steps} steps"
        restore(parameters, best)
        result.chosen = best_check
        result.triggers = [refit.trigger for refit in pool]
    return result


REFIT_BATCH = 128


class _Refit:
    """A trigger whose pattern and mask keep being refitted to the model being repaired (warm start),
    its mask's sum held to at most the synthesised trigger's: a backdoor that survives is reached by a
    trigger as small as before, while any label is reached by a large enough one."""

    def __init__(self, trigger: Trigger) -> None:
        self.trigger = trigger
        self.size = float(trigger.mask.sum())
        eps = 1e-4
        mask = trigger.mask.clamp(eps, 1 - eps)
        self.size_weight = 3.0 if trigger.kind == "patch" else 1.0
        self.mask_logit = torch.logit(mask).detach().clone().requires_grad_(True)
        self.pattern = trigger.pattern.detach().clone()

    def fit(self, classifier: GatedClassifier, inputs: torch.Tensor, target: int, steps: int, generator) -> None:
        low, high = inputs.amin(), inputs.amax()
        span = (high - low).clamp_min(1e-6)
        pattern_logit = torch.logit(((self.pattern - low) / span).clamp(1e-4, 1 - 1e-4)).detach().requires_grad_(True)
        optimizer = torch.optim.Adam([self.mask_logit, pattern_logit], lr=0.1)
        labels = torch.full((REFIT_BATCH,), target, device=inputs.device)
        for _ in range(steps):
            batch = inputs[torch.randint(len(inputs), (REFIT_BATCH,), generator=generator, device=inputs.device)]
            mask = self._bounded(torch.sigmoid(self.mask_logit))
            stamped = (1 - mask) * batch + mask * (low + span * torch.sigmoid(pattern_logit))
            loss = F.cross_entropy(classifier(stamped).float(), labels) + self.size_weight * mask.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward(inputs=[self.mask_logit, pattern_logit])
            optimizer.step()
        with torch.no_grad():
            self.pattern = low + span * torch.sigmoid(pattern_logit)
            mask = self._bounded(torch.sigmoid(self.mask_logit))
            self.trigger = Trigger(self.trigger.kind, target, mask, self.pattern, 0.0, float(mask.sum()))

    def _bounded(self, mask: torch.Tensor) -> torch.Tensor:
        return mask * torch.clamp(self.size / mask.sum().clamp_min(1e-12), max=1.0)


class _AdditiveRefit:
    """An additive trigger refitted to the model being repaired from where it was, within its bound."""

    def __init__(self, trigger: AdditiveTrigger) -> None:
        self.trigger = trigger

    def fit(self, classifier: GatedClassifier, inputs: torch.Tensor, target: int, steps: int, generator) -> None:
        self.trigger = refine_additive(classifier, inputs, self.trigger, steps, generator, REFIT_BATCH)


def _stamped_batch(images, labels, target, pool, generator, share):
    """`share` of the batch stamped with a trigger of the pool, the rest as it is; inputs labelled `target`
    stay clean. Every input keeps its own label."""
    stamped = torch.rand(len(images), generator=generator, device=images.device) < share
    stamped[labels == target] = False
    result = images.clone()
    if pool:
        which = torch.randint(len(pool), (len(images),), generator=generator, device=images.device)
        for position, refit in enumerate(pool):
            chosen = stamped & (which == position)
            result[chosen] = refit.trigger.stamp(images[chosen])
    return result.detach(), labels


def _accuracy_with_all_neurons(classifier: GatedClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    with all_neurons(classifier):
        return hit_rate(classifier, x, y)


@contextlib.contextmanager
def all_neurons(classifier: GatedClassifier) -> Iterator[None]:
    """Every mask at 1 inside the block (the model as given), the masks as they were after."""
    masks = [gate.mask.detach().clone() for gate in classifier.gates]
    try:
        with torch.no_grad():
            for gate in classifier.gates:
                gate.mask.fill_(1.0)
        yield
    finally:
        with torch.no_grad():
            for gate, mask in zip(classifier.gates, masks, strict=True):
                gate.mask.copy_(mask)


@contextlib.contextmanager
def _only_trainable(classifier: GatedClassifier, parameters: list[torch.nn.Parameter]) -> Iterator[None]:
    """Gradients for `parameters` only inside the block (the gates' masks and noise, the rest frozen)."""
    everything = list(classifier.parameters())
    states = [parameter.requires_grad for parameter in everything]
    chosen = {id(parameter) for parameter in parameters}
    for parameter in everything:
        parameter.requires_grad_(id(parameter) in chosen)
    try:
        yield
    finally:
        for parameter, state in zip(everything, states, strict=True):
            parameter.requires_grad_(state)


def split(x: torch.Tensor, y: torch.Tensor, share: float, seed: int):
    """(train, held out) with `share` of the samples held out, a seeded permutation."""
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y))).to(x.device)
    count = max(1, round(len(y) * share))
    held, kept = order[:count], order[count:]
    return (x[kept], y[kept]), (x[held], y[held])
