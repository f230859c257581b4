"""What a batch runs: one `BatchJob` per model, from INPUT files or folders and an optional manifest.

A manifest (JSON, or YAML when pyyaml is installed) lists models with their own data, output and
settings; its `defaults` and each entry override the command-line settings, paths are relative to
the manifest's folder and outputs to the out-dir:

    {"defaults": {"data": "clean.npz", "iterations": 500},
     "models": [{"model": "a.onnx", "test_data": "a_test.npz", "threshold": 0.3},
                {"model": "b.onnx", "name": "vendor_b", "output": "b/purified.onnx"}]}
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from anp_onnx.errors import AnpError, one_line
from anp_onnx.methods.registry import get_method
from anp_onnx.options import (
    PATHS,
    PRUNING_AMOUNT,
    SETTINGS,
    method_settings,
    refuse_foreign,
    refuse_two_amounts,
    setting,
)

PATH_KEYS = tuple(option.name for option in PATHS)
SETTING_KEYS = tuple(option.name for option in SETTINGS)  # the manifest's keys are the option declarations' names
ENTRY_KEYS = ("model", "name", "output")
# the PNGs of --report-dir per method: the synthetic trigger, the pruning rounds and the repair, or ANP's
# masks and sweep
FIGURE_KINDS = {"trigger": ("trigger", "rounds", "repair"), "anp": ("masks", "sweep")}


@dataclass(frozen=True)
class PurifyOptions:
    """Everything that decides a model's result (what the resume fingerprint covers), device aside:
    `settings` is the method's settings dataclass (anp_onnx.methods.settings)."""

    data: Path
    test_data: Path | None
    poison_data: Path | None
    method: str
    settings: object
    class_output: str | None

    def as_dict(self) -> dict[str, object]:
        return {
            **{key: None if getattr(self, key) is None else str(getattr(self, key)) for key in PATH_KEYS},
            "method": self.method,
            "settings": asdict(self.settings),
            "class_output": self.class_output,
        }


@dataclass(frozen=True)
class BatchJob:
    """One model of a batch: where it comes from, where its output, report and plots go, how to purify it."""

    name: str
    model: Path
    output: Path
    report: Path
    plots_dir: Path | None
    options: PurifyOptions
    device: str = "auto"
    fingerprint: str | None = None  # set by the batch: hash of the inputs' bytes and the options

    @property
    def plot_paths(self) -> dict[str, Path]:
        if self.plots_dir is None:
            return {}
        kinds = FIGURE_KINDS.get(self.options.method, ())
        return {kind: self.plots_dir / f"{self.name}.{kind}.png" for kind in kinds}


def plan_jobs(
    inputs: Iterable[Path],
    manifest: Path | None,
    settings: Mapping[str, object],
    out_dir: Path,
    report_dir: Path | None = None,
    device: str = "auto",
    command_line: Mapping[str, str] | None = None,
) -> list[BatchJob]:
    """The jobs for INPUT files/folders (with `settings`: the options the user gave, keys as the option
    declarations name them) and for a manifest's entries (its values over `settings`); AnpError for
    anything unusable. `command_line` says how the command line spelled each of `settings`, for messages."""
    given = [key for key, value in settings.items() if value is not None and key not in PATH_KEYS]
    entries = [({**settings, "model": path}, Path(), given) for path in expand_inputs(inputs, out_dir)]
    if manifest is not None:
        from_cwd = {
            key: Path(value).absolute() if key in PATH_KEYS and value else value for key, value in settings.items()
        }
        entries += [(entry, manifest.parent, [*given, *own]) for entry, own in read_manifest(manifest, from_cwd)]
    if not entries:
        raise AnpError("no models: give .onnx files or folders of them, or --manifest")
    names = _names(
        [_resolve(base, values["model"]) for values, base, _ in entries],
        [values.get("name") for values, _, _ in entries],
    )
    jobs = []
    for (values, base, explicit), name in zip(entries, names, strict=True):
        model = _resolve(base, values["model"])
        if not model.is_file():
            raise AnpError(f"model {name}: {model}: no such file")
        jobs.append(
            BatchJob(
                name=name,
                model=model,
                output=out_dir / str(values["output"]) if values.get("output") else out_dir / f"{name}.onnx",
                report=(report_dir or out_dir) / f"{name}.report.json",
                plots_dir=report_dir,
                options=purify_options(values, base, f"model {name}", explicit, command_line),
                device=device,
            )
        )
    _check_distinct(jobs)
    return jobs


def expand_inputs(inputs: Iterable[Path], out_dir: Path) -> list[Path]:
    """INPUT arguments as model files: a file as is, a folder as the .onnx files in it (sorted)."""
    models: list[Path] = []
    for path in inputs:
        if path.is_dir():
            if path.resolve() == out_dir.resolve():
                raise AnpError(f"{path}: the input folder is also --out-dir; write the outputs elsewhere")
            found = sorted(child for child in path.iterdir() if child.suffix == ".onnx" and child.is_file())
            if not found:
                raise AnpError(f"{path}: no .onnx files in this folder")
            models += found
        elif path.is_file():
            models.append(path)
        else:
            raise AnpError(f"{path}: no such file or folder")
    return models


def read_manifest(path: Path, settings: Mapping[str, object]) -> list[tuple[dict[str, object], list[str]]]:
    """The manifest's model entries, each merged over its `defaults` and over `settings`, with the
    setting keys the entry itself gives."""
    document = _load_document(path)
    if isinstance(document, list):
        document = {"models": document}
    if not isinstance(document, dict) or not isinstance(document.get("models"), list):
        raise AnpError(f"--manifest {path}: expected a list of models or a mapping with a 'models' list")
    unknown = set(document) - {"defaults", "models"}
    if unknown:
        raise AnpError(f"--manifest {path}: unknown top-level keys {', '.join(sorted(unknown))}")
    defaults = document.get("defaults") or {}
    _check_keys(defaults, f"--manifest {path}: defaults", allowed=(*PATH_KEYS, *SETTING_KEYS))
    entries = []
    for position, entry in enumerate(document["models"], start=1):
        if isinstance(entry, str):
            entry = {"model": entry}
        where = f"--manifest {path}: model {position}"
        _check_keys(entry, where, allowed=(*ENTRY_KEYS, *PATH_KEYS, *SETTING_KEYS))
        if "model" not in entry:
            raise AnpError(f"{where}: needs a 'model' path")
        own = [key for key in entry if key in SETTING_KEYS]
        entries.append((_override(_override(dict(settings), defaults), entry), own))
    return entries


def purify_options(
    values: Mapping[str, object],
    base: Path,
    where: str,
    explicit: Iterable[str] | None = None,
    command_line: Mapping[str, str] | None = None,
) -> PurifyOptions:
    """Checked settings -> PurifyOptions; data paths are resolved against `base`. Of the `explicit` keys
    (given on the command line or in the model's own entry; None: all), an option the model's method does
    not use is refused; one from the manifest's `defaults` is left out for that model. Messages name an
    option as `command_line` spells it, else as the manifest's 'key'."""
    for key, value in values.items():
        if key in SETTING_KEYS and value is not None:
            problem = setting(key).problem(value)
            if problem:
                raise AnpError(f"{where}: '{key}' {problem}")
    if not values.get("data"):
        raise AnpError(f"{where}: no clean data: give --data, or 'data' in the manifest")
    method = str(values.get("method") or setting("method").default)
    get_method(method)
    quoted = {key: f"'{key}'" for key in SETTING_KEYS} | dict(command_line or {})
    try:
        refuse_two_amounts(values, quoted)
        given = [key for key in (values if explicit is None else explicit) if values.get(key) is not None]
        refuse_foreign(method, given, quoted)
    except AnpError as error:
        raise AnpError(f"{where}: {error}") from None
    for key in PATH_KEYS:
        if values.get(key) and not _resolve(base, values[key]).is_file():
            raise AnpError(f"{where}: {key} {_resolve(base, values[key])}: no such file")
    return PurifyOptions(
        data=_resolve(base, values["data"]),
        test_data=_resolve(base, values["test_data"]) if values.get("test_data") else None,
        poison_data=_resolve(base, values["poison_data"]) if values.get("poison_data") else None,
        method=method,
        settings=method_settings(method, values),
        class_output=values.get("class_output"),
    )


def _load_document(path: Path) -> object:
    if not path.is_file():
        raise AnpError(f"--manifest {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise AnpError(f"--manifest {path}: cannot read it ({error})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise AnpError(f"--manifest {path}: YAML needs pyyaml (pip install pyyaml); or write it as JSON") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise AnpError(f"--manifest {path}: not valid YAML ({one_line(error)})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise AnpError(f"--manifest {path}: not valid JSON ({error})") from None


def _override(lower: dict[str, object], upper: Mapping[str, object]) -> dict[str, object]:
    """`upper` over `lower`; a pruning choice in `upper` replaces any in `lower` rather than clashing."""
    if any(upper.get(key) is not None for key in PRUNING_AMOUNT):
        lower = {key: value for key, value in lower.items() if key not in PRUNING_AMOUNT}
    return {**lower, **upper}


def _check_keys(entry: object, where: str, allowed: tuple[str, ...]) -> None:
    if not isinstance(entry, dict):
        raise AnpError(f"{where}: expected a mapping, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
        raise AnpError(f"{where}: unknown keys {', '.join(map(str, unknown))} (known: {', '.join(allowed)})")
    for key in (*ENTRY_KEYS, *PATH_KEYS):
        if entry.get(key) is not None and not isinstance(entry[key], str | Path):
            raise AnpError(f"{where}: '{key}' must be a path or name, got {entry[key]!r}")


def _resolve(base: Path, path: object) -> Path:
    path = Path(str(path))
    return path if path.is_absolute() else base / path


def _names(models: list[Path], given: list[object]) -> list[str]:
    """Given names, else file stems; stems that two models share get their folder's name in front."""
    stems = [model.stem for model in models]
    names = []
    for model, stem, name in zip(models, stems, given, strict=True):
        if name is not None:
            names.append(str(name))
        elif stems.count(stem) > 1:
            names.append(f"{model.resolve().parent.name}_{stem}")
        else:
            names.append(stem)
    for name in names:
        if not name or name != Path(name).name or name.startswith("."):
            raise AnpError(f"model name {name!r}: must be a plain file name (no folders, not hidden)")
    return names


def _check_distinct(jobs: list[BatchJob]) -> None:
    seen: dict[Path, str] = {}
    for job in jobs:
        for path in (job.output, job.report):
            other = seen.get(path.resolve())
            if other is not None:
                raise AnpError(f"models {other} and {job.name} would both write {path}: give them distinct names")
            seen[path.resolve()] = job.name
        if job.output.resolve() == job.model.resolve():
            raise AnpError(f"model {job.name}: its output {job.output} is the input model")
