"""Where a batch's models run: one after another in this process, or as Ray tasks on a local or
existing Ray cluster (one GPU per task when the cluster has GPUs). Both hand back the same
`ModelOutcome`s, so the summary does not depend on the executor."""

from __future__ import annotations

import os
from collections.abc import Callable

from anp_onnx.batch.manifest import BatchJob
from anp_onnx.batch.runner import ModelOutcome, outcome_of, run_job
from anp_onnx.errors import AnpError, one_line

EXECUTORS = ("local", "ray")


class LocalExecutor:
    """Models one after another in this process; an interrupt stops at once (atomic writes clean up)."""

    name = "local"

    def run(self, jobs: list[BatchJob], record: Callable[[ModelOutcome], None]) -> None:
        for job in jobs:
            record(run_job(job))


class RayExecutor:
    """One Ray task per model. Joins the cluster that `ray.init()` finds (RAY_ADDRESS, or one this
    process already started), else starts a local instance and stops it afterwards. Workers must see
    the same paths (a shared file system) and have anp-onnx installed."""

    name = "ray"

    def __init__(self) -> None:
        try:
            import ray
        except ImportError:
            raise AnpError("--executor ray needs Ray: pip install 'anp-onnx[ray]'") from None
        self.ray = ray

    def run(self, jobs: list[BatchJob], record: Callable[[ModelOutcome], None]) -> None:
        ray = self.ray
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, logging_level="warning")
        try:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 and jobs[0].device != "cpu" else 0
            task = ray.remote(run_job).options(num_cpus=1, num_gpus=gpus, max_retries=0)
            by_reference = {task.remote(job): job for job in jobs}
            pending = list(by_reference)
            try:
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    record(self._outcome(done[0], by_reference[done[0]]))
            except KeyboardInterrupt:
                for reference in pending:
                    ray.cancel(reference)  # KeyboardInterrupt in the task: its atomic writes clean up
                raise
        finally:
            if started_here:
                ray.shutdown()

    def _outcome(self, reference: object, job: BatchJob) -> ModelOutcome:
        """The task's outcome; a task that died (a crashed worker, a lost node) is that model's failure."""
        try:
            return self.ray.get(reference)
        except self.ray.exceptions.RayError as error:
            reason = f"ray task failed ({type(error).__name__}: {one_line(error)[:300]})"
            return outcome_of(job, "failed", reason)


def make_executor(name: str) -> LocalExecutor | RayExecutor:
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        return RayExecutor()
    raise AnpError(f"unknown executor {name!r}: use {' or '.join(EXECUTORS)}")
