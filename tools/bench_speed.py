"""How fast is anp-onnx? Time ANP's iteration against a plain training step and a reference-style loop,
and onnxruntime evaluation through `Evaluator` against a bare `InferenceSession`.

    .venv/bin/python tools/bench_speed.py [--example examples/badnets_resnet_bn] [--batch-size 128] \
        [--steps 20] [--json out/bench_speed.json]

Measured on the same model and data, in one run, after `--warmup` steps that are not counted (medians):

(a) train: one SGD step of the onnx2torch-converted model on one fixed batch (the unit of cost);
(b) anp: one iteration of `anp.optimise_masks` (the intervals between its `on_iteration` callbacks);
(c) reference: one iteration of a loop written like the paper's `mask_train`: each BatchNorm's
    weight/bias rebuilt every pass from mask and noise, three forward passes per iteration;
(d) evaluation throughput: `Evaluator(model, "cpu").predict` against a bare onnxruntime session;
(e) end to end: `anp_onnx.pipeline.purify.purify` with every default (the trigger-guided method) on the
    example, load to written and measured file, against 2 000 reference-style iterations (2 000 times
    (c)'s median, the paper's run length; not run whole). `--no-end-to-end` leaves it out;
(f) trigger synthesis, where the default method spends most of its time: one step of
    `trigger.synthesise_trigger` (BatchNorm folded, channels-last, identity gates skipped, bfloat16
    where native: `anp_onnx/bridge/fast_eval.py`) against the same step written plainly (the gated model in
    eval mode, float32), interleaved like (a)-(c).

(a), (b) and (c) are interleaved: (a) and (c) run inside (b)'s callback, and the callback's own time
is left out of (b)'s intervals, so the order in time is B A C B A C ... (d) runs afterwards, the
evaluator and the bare session alternating: onnxruntime's thread pool keeps spinning for a moment
after each run, which would slow the torch step right after it on a machine with few cores.

`BENCH_THREADS=N` sets torch's thread count (torch's default otherwise).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import click
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from anp_onnx.bridge.fast_eval import precision_name  # noqa: E402
from anp_onnx.bridge.importer import convert_to_torch, import_model  # noqa: E402
from anp_onnx.data import load_samples  # noqa: E402
from anp_onnx.methods import anp  # noqa: E402
from anp_onnx.methods.anp import AnpSettings  # noqa: E402
from anp_onnx.methods.perturbation import calibrate, tensors  # noqa: E402
from anp_onnx.methods.settings import TriggerMethodSettings  # noqa: E402
from anp_onnx.methods.trigger.guided import GuidedSettings  # noqa: E402
from anp_onnx.methods.trigger.synthesis import INITIAL_MASKS, SIZE_WEIGHTS, TriggerSettings, synthesise_trigger  # noqa: E402
from anp_onnx.onnx.model import input_shape, load_model  # noqa: E402
from anp_onnx.onnx.neurons import build_neuron_map  # noqa: E402
from anp_onnx.pipeline.purify import PurifyResult, purify  # noqa: E402
from anp_onnx.pipeline.scan import calibrated_classifier  # noqa: E402
from anp_onnx.prune import PruningPlan  # noqa: E402
from anp_onnx.validate.evaluate import EVAL_BATCH, Evaluator  # noqa: E402

DEFAULT_EXAMPLE = ROOT / "examples" / "badnets_resnet_bn"
TRAIN_LR = 0.01
REFERENCE_ITERATIONS = 2000  # the paper's run length, for (e)


# ----------------------------------------------------------------------------- machine


def configure_threads() -> None:
    value = os.environ.get("BENCH_THREADS", "").strip()
    if value:
        torch.set_num_threads(int(value))


def torch_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def machine(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cuda": device.type == "cuda",
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device)
    return info


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- (a) plain training step


def first_output(outputs: object) -> torch.Tensor:
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


def make_train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    """One SGD step of the whole converted model on one fixed batch."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=TRAIN_LR, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(first_output(model(images)), labels)
        loss.backward()
        optimizer.step()

    return step


# ----------------------------------------------------------------------------- (c) reference-style loop


class PerturbedBatchNorm(nn.Module):
    """A BatchNorm whose scale and shift are rebuilt on every pass from a neuron mask and noise,
    the way the paper's code defines its neurons: weight = gamma * (m + delta), bias = beta * (1 + xi)."""

    def __init__(self, batch_norm: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.batch_norm = batch_norm
        channels = batch_norm.num_features
        self.neuron_mask = nn.Parameter(torch.ones(channels, device=batch_norm.weight.device))
        self.neuron_noise = nn.Parameter(torch.zeros(channels, device=batch_norm.weight.device))
        self.neuron_noise_bias = nn.Parameter(torch.zeros(channels, device=batch_norm.weight.device))
        self.perturbed = False

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        bn = self.batch_norm
        if self.perturbed:
            weight = bn.weight * (self.neuron_mask + self.neuron_noise)
            bias = bn.bias * (1.0 + self.neuron_noise_bias)
        else:
            weight = bn.weight * self.neuron_mask
            bias = bn.bias
        return F.batch_norm(
            inputs,
            bn.running_mean,
            bn.running_var,
            weight,
            bias,
            training=self.training,
            momentum=0.1 if bn.momentum is None else bn.momentum,
            eps=bn.eps,
        )


def with_perturbed_batch_norm(model: nn.Module) -> list[PerturbedBatchNorm]:
    """Replace every BatchNorm module of `model` in place; returns the replacements."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    replacements = []
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        replacement = PerturbedBatchNorm(getattr(parent, child))
        setattr(parent, child, replacement)
        replacements.append(replacement)
    return replacements


def make_reference_iteration(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: AnpSettings,
    generator: torch.Generator,
) -> Callable[[], None]:
    """One iteration of the paper's mask_train: random noise start, one signed-gradient step on the
    noise (noisy pass 1), then alpha * clean loss + (1 - alpha) * noisy loss (passes 2 and 3) and an
    SGD(momentum) step on the masks, clamped to [0, 1]. Model in train mode, weights not frozen."""
    layers = with_perturbed_batch_norm(model)
    if not layers:
        raise click.ClickException("the reference loop needs BatchNormalization nodes: use an example kept with BN")
    masks = [layer.neuron_mask for layer in layers]
    noises = [noise for layer in layers for noise in (layer.neuron_noise, layer.neuron_noise_bias)]
    mask_optimizer = torch.optim.SGD(masks, lr=settings.mask_lr, momentum=settings.momentum)
    noise_optimizer = torch.optim.SGD(noises, lr=settings.eps)  # eps / anp_steps, one step
    model.train()

    def perturb(on: bool) -> None:
        for layer in layers:
            layer.perturbed = on

    def iteration() -> None:
        index = torch.randint(len(x), (settings.batch_size,), generator=generator, device=x.device)
        images, labels = x[index], y[index]
        if settings.augment and images.ndim == 4 and min(images.shape[2:]) >= 8:
            images = anp.augment(images, generator)
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for noise in noises:
                noise.uniform_(-settings.eps, settings.eps)
        perturb(True)
        noise_optimizer.zero_grad()
        loss_noise = -F.cross_entropy(first_output(model(images)), labels)
        loss_noise.backward()
        for noise in noises:
            noise.grad = torch.sign(noise.grad)
        noise_optimizer.step()

        mask_optimizer.zero_grad()
        perturb(True)
        loss_robust = F.cross_entropy(first_output(model(images)), labels)
        perturb(False)
        loss_natural = F.cross_entropy(first_output(model(images)), labels)
        loss = settings.alpha * loss_natural + (1 - settings.alpha) * loss_robust
        loss.backward()
        mask_optimizer.step()
        with torch.no_grad():
            for mask in masks:
                mask.clamp_(0.0, 1.0)

    return iteration


# ----------------------------------------------------------------------------- (a)-(c) interleaved


def time_torch(
    example: Path, batch_size: int, steps: int, warmup: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Seconds per (a) train step, (b) ANP iteration, (c) reference iteration; warm-up steps dropped."""
    model = load_model(example / "model.onnx")
    neuron_map = build_neuron_map(model)
    clean = load_samples(example / "clean.npz", input_shape(model), "clean data")
    x, y = tensors(clean.x, clean.y, device)
    settings = AnpSettings(iterations=warmup + steps, batch_size=batch_size)
    generator = torch.Generator(device=device).manual_seed(1)

    fixed = torch.randint(len(x), (batch_size,), generator=generator, device=device)
    train_step = make_train_step(convert_to_torch(model).to(device), x[fixed], y[fixed])
    reference_iteration = make_reference_iteration(convert_to_torch(model).to(device), x, y, settings, generator)
    classifier = import_model(model, neuron_map, renormalise=True).to(device)
    torch.manual_seed(settings.seed)
    calibrate(classifier, x, neuron_mode=settings.neuron_mode)

    times: dict[str, list[float]] = {"train": [], "anp": [], "reference": []}
    last_exit = [0.0]

    def timed(function: Callable[[], None]) -> float:
        synchronise(device)
        start = time.perf_counter()
        function()
        synchronise(device)
        return time.perf_counter() - start

    def on_iteration(_iteration: int) -> None:
        synchronise(device)
        times["anp"].append(time.perf_counter() - last_exit[0])
        times["train"].append(timed(train_step))
        times["reference"].append(timed(reference_iteration))
        synchronise(device)
        last_exit[0] = time.perf_counter()

    synchronise(device)
    last_exit[0] = time.perf_counter()
    anp.optimise_masks(classifier, x, y, settings, on_iteration)
    counts = {
        "anp_neurons": sum(layer.channels for layer in neuron_map.layers),
        "reference_neurons": sum(
            module.num_features for module in classifier.batch_norm_modules() if hasattr(module, "num_features")
        ),
        "clean_samples": len(clean),
    }
    return {name: values[warmup:] for name, values in times.items()}, counts


# ----------------------------------------------------------------------------- (f) trigger synthesis


def make_plain_trigger_step(
    classifier: nn.Module, others: torch.Tensor, target: int, batch_size: int, generator: torch.Generator
) -> Callable[[], None]:
    """One step of a patch trigger's optimisation written plainly: the gated classifier in eval mode,
    float32, every gate applied; the loss and optimiser of `synthesise_trigger` (the pattern kept in
    [0, 1] instead of the data's range, which costs the same)."""
    classifier.eval()
    for parameter in classifier.parameters():
        parameter.requires_grad_(False)
    mask_shape = [1, 1, *others.shape[2:]] if others.ndim == 4 else [1, *others.shape[1:]]
    initial = torch.logit(torch.tensor(INITIAL_MASKS["patch"])).item()
    mask_logit = torch.full(mask_shape, initial, device=others.device, requires_grad=True)
    pattern_logit = torch.zeros((1, *others.shape[1:]), device=others.device, requires_grad=True)
    optimizer = torch.optim.Adam([mask_logit, pattern_logit], lr=0.1)
    labels = torch.full((batch_size,), target, device=others.device)

    def step() -> None:
        batch = others[torch.randint(len(others), (batch_size,), generator=generator, device=others.device)]
        mask = torch.sigmoid(mask_logit)
        stamped = (1 - mask) * batch + mask * torch.sigmoid(pattern_logit)
        loss = F.cross_entropy(classifier(stamped), labels) + SIZE_WEIGHTS["patch"] * mask.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def time_trigger_steps(
    example: Path, batch_size: int, steps: int, warmup: int, device: torch.device
) -> tuple[dict[str, list[float]], str]:
    """Seconds per trigger-synthesis step, anp-onnx's (`synthesise_trigger`) and the plain one,
    interleaved (the plain step runs inside the other's `on_step` callback, left out of its
    intervals), and the precision anp-onnx's ran in."""
    classifiers = []
    for _ in range(2):
        classifier, x, y = calibrated_classifier(example / "model.onnx", example / "clean.npz", device, seed=0)
        classifiers.append(classifier)
    target = int(y[0])
    generator = torch.Generator(device=device).manual_seed(1)
    plain_step = make_plain_trigger_step(classifiers[1], x[y != target], target, batch_size, generator)
    times: dict[str, list[float]] = {"trigger_fast": [], "trigger_plain": []}
    last_exit = [0.0]

    def on_step(_step: int) -> None:
        synchronise(device)
        times["trigger_fast"].append(time.perf_counter() - last_exit[0])
        start = time.perf_counter()
        plain_step()
        synchronise(device)
        times["trigger_plain"].append(time.perf_counter() - start)
        last_exit[0] = time.perf_counter()

    trigger_settings = TriggerSettings("patch", steps=warmup + steps, batch_size=batch_size)
    synchronise(device)
    last_exit[0] = time.perf_counter()
    synthesise_trigger(classifiers[0], x, y, target, trigger_settings, on_step)
    return {name: values[warmup:] for name, values in times.items()}, precision_name(classifiers[0], device)


# ----------------------------------------------------------------------------- (d) evaluation


def time_evaluation(example: Path, steps: int, warmup: int) -> tuple[dict[str, list[float]], int]:
    """Seconds per pass over test.npz: Evaluator.predict and a bare session, alternating."""
    import onnxruntime as ort

    path = example / "model.onnx"
    model = load_model(path)
    test = load_samples(example / "test.npz", input_shape(model), "test data")
    evaluator = Evaluator(path, "cpu")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def bare() -> None:
        for start in range(0, len(test.x), EVAL_BATCH):
            session.run(None, {name: test.x[start : start + EVAL_BATCH]})

    def evaluate() -> None:
        evaluator.predict(test.x)

    times: dict[str, list[float]] = {"evaluator": [], "bare": []}
    for _ in range(warmup + steps):
        for key, function in (("evaluator", evaluate), ("bare", bare)):
            start = time.perf_counter()
            function()
            times[key].append(time.perf_counter() - start)
    return {key: values[warmup:] for key, values in times.items()}, len(test.x)


# ----------------------------------------------------------------------------- report


def summarise(
    torch_times: dict[str, list[float]],
    eval_times: dict[str, list[float]],
    eval_samples: int,
    trigger_times: dict[str, list[float]] | None = None,
) -> tuple[dict[str, dict[str, object]], dict[str, float]]:
    trigger_times = trigger_times or {}
    every = {**torch_times, **eval_times, **trigger_times}
    medians = {key: statistics.median(values) for key, values in every.items()}
    throughput = {key: eval_samples / medians[key] for key in eval_times}
    measurements: dict[str, dict[str, object]] = {
        "train_step": {"median_s": medians["train"], "samples_s": torch_times["train"]},
        "anp_iteration": {"median_s": medians["anp"], "samples_s": torch_times["anp"]},
        "reference_iteration": {"median_s": medians["reference"], "samples_s": torch_times["reference"]},
        "evaluation": {
            "evaluator_median_s": medians["evaluator"],
            "bare_median_s": medians["bare"],
            "evaluator_samples_per_s": throughput["evaluator"],
            "bare_samples_per_s": throughput["bare"],
            "samples": eval_samples,
            "evaluator_samples_s": eval_times["evaluator"],
            "bare_samples_s": eval_times["bare"],
        },
    }
    ratios = {
        "anp_over_train": medians["anp"] / medians["train"],
        "reference_over_train": medians["reference"] / medians["train"],
        "anp_over_reference": medians["anp"] / medians["reference"],
        "evaluator_over_bare_throughput": throughput["evaluator"] / throughput["bare"],
    }
    if trigger_times:
        measurements["trigger_step"] = {
            "fast_median_s": medians["trigger_fast"],
            "plain_median_s": medians["trigger_plain"],
            "fast_samples_s": trigger_times["trigger_fast"],
            "plain_samples_s": trigger_times["trigger_plain"],
        }
        ratios["trigger_fast_over_plain"] = medians["trigger_fast"] / medians["trigger_plain"]
    return measurements, ratios


def table(result: dict[str, object]) -> str:
    info, settings = result["machine"], result["settings"]
    m, r = result["measurements"], result["ratios"]
    ev = m["evaluation"]
    where = "CUDA " + str(info.get("cuda_device", "")) if info["cuda"] else "cpu"
    end_to_end = m.get("purify_end_to_end")
    lines = [
        f"machine: {info['processor']} / {info['cpu_count']} CPUs / torch on {where} "
        f"({info['torch_threads']} threads), torch {info['torch']}",
        f"example: {settings['example']}  batch {settings['batch_size']}  "
        f"{settings['steps']} steps after {settings['warmup']} warm-up",
        "",
        f"{'measurement':<40} {'median':>14}",
        f"{'(a) train step (SGD, whole model)':<40} {m['train_step']['median_s'] * 1000:>11.1f} ms",
        f"{'(b) ANP iteration (optimise_masks)':<40} {m['anp_iteration']['median_s'] * 1000:>11.1f} ms",
        f"{'(c) reference-style iteration':<40} {m['reference_iteration']['median_s'] * 1000:>11.1f} ms",
        f"{'(d) Evaluator.predict':<40} {ev['evaluator_samples_per_s']:>9.0f} img/s",
        f"{'(d) bare InferenceSession.run':<40} {ev['bare_samples_per_s']:>9.0f} img/s",
        "",
        f"b/a  {r['anp_over_train']:.2f}   c/a  {r['reference_over_train']:.2f}   "
        f"b/c  {r['anp_over_reference']:.2f}   evaluator/bare throughput  {r['evaluator_over_bare_throughput']:.2f}",
    ]
    if "trigger_step" in m:
        trigger = m["trigger_step"]
        lines += [
            "",
            f"(f) trigger step, anp-onnx ({info['precision']}): {trigger['fast_median_s'] * 1000:.1f} ms; "
            f"plain (float32, gated): {trigger['plain_median_s'] * 1000:.1f} ms; "
            f"ratio {r['trigger_fast_over_plain']:.2f}",
        ]
    if end_to_end:
        before, after = end_to_end["before"], end_to_end["after"]
        lines += [
            "",
            f"(e) purify, defaults (method {end_to_end['method']}), end to end: {end_to_end['seconds']:.1f} s; "
            f"{REFERENCE_ITERATIONS} reference iterations: {end_to_end['reference_2000_s']:.1f} s; "
            f"ratio {r['purify_over_reference_2000']:.3f}",
            f"    ACC {_percent(before['acc'])} -> {_percent(after['acc'])}, "
            f"ASR {_percent(before['asr'])} -> {_percent(after['asr'])}, {end_to_end['pruned']} neurons pruned",
        ]
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def timed_purify(example: Path, stages: GuidedSettings | None = None) -> tuple[PurifyResult, float]:
    """`purify` (the trigger method's `stages`, default the package's) on the folder's model.onnx and
    clean.npz, with its test.npz and poison.npz when present: the result and the wall time."""
    with tempfile.TemporaryDirectory(prefix="anp-bench-") as folder:
        started = time.perf_counter()
        result = purify(
            example / "model.onnx",
            example / "clean.npz",
            Path(folder) / "purified.onnx",
            test_data=example / "test.npz" if (example / "test.npz").is_file() else None,
            poison_data=example / "poison.npz" if (example / "poison.npz").is_file() else None,
            settings=TriggerMethodSettings(stages=stages),
        )
        return result, time.perf_counter() - started


def pruning_plan(result: PurifyResult) -> PruningPlan:
    """The pruning the method decided (before repair, which may replace it with changed weights)."""
    return result.method_plan if result.method_plan is not None else result.plan


def time_end_to_end(example: Path) -> dict[str, object]:
    """Default `purify` on the example, wall time and what it reached (ACC / ASR on its test files)."""
    result, seconds = timed_purify(example)
    return {
        "seconds": seconds,
        "method": result.method,
        "before": {"acc": result.before.acc, "asr": result.before.asr},
        "after": {"acc": result.after.acc, "asr": result.after.asr},
        "pruned": len(pruning_plan(result).neurons),
        "repair_ran": bool(result.repair and result.repair.ran),
        "verdict": result.verdict.name if result.verdict else None,
        "timings_s": result.timings,
    }


def run_benchmark(
    example: Path, batch_size: int, steps: int, warmup: int, end_to_end: bool = True
) -> dict[str, object]:
    configure_threads()
    device = torch_device()
    torch_times, counts = time_torch(example, batch_size, steps, warmup, device)
    eval_times, eval_samples = time_evaluation(example, steps, warmup)
    trigger_times, precision = time_trigger_steps(example, batch_size, steps, warmup, device)
    measurements, ratios = summarise(torch_times, eval_times, eval_samples, trigger_times)
    if end_to_end:
        measurements["purify_end_to_end"] = time_end_to_end(example)
        reference_run = REFERENCE_ITERATIONS * measurements["reference_iteration"]["median_s"]
        measurements["purify_end_to_end"]["reference_2000_s"] = reference_run
        ratios["purify_over_reference_2000"] = measurements["purify_end_to_end"]["seconds"] / reference_run
    return {
        "machine": {**machine(device), "precision": precision},  # of trigger synthesis and unlearning
        "settings": {
            "example": str(example),
            "batch_size": batch_size,
            "steps": steps,
            "warmup": warmup,
            "eval_batch": EVAL_BATCH,
            **counts,
        },
        "measurements": measurements,
        "ratios": ratios,
    }


@click.command()
@click.option(
    "--example",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=DEFAULT_EXAMPLE,
    show_default=True,
    help="Folder with model.onnx, clean.npz and test.npz (the model must keep its BatchNormalization nodes).",
)
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--steps", default=20, show_default=True, type=click.IntRange(min=1), help="Timed steps per measurement.")
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(min=0), help="Untimed steps first.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the results here.")
@click.option("--end-to-end/--no-end-to-end", default=True, show_default=True, help="(e): default purify, whole.")
def main(example: Path, batch_size: int, steps: int, warmup: int, json_path: Path | None, end_to_end: bool) -> None:
    """Time ANP iterations, a reference-style loop, a training step and onnxruntime evaluation."""
    result = run_benchmark(example, batch_size, steps, warmup, end_to_end)
    click.echo(table(result))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        click.echo(f"wrote {json_path}")


if __name__ == "__main__":
    main()
