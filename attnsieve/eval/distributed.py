"""Run the evaluation grid's inputs on a Ray cluster (optional extra `ray`).

Each worker is an actor that loads the model once and evaluates whole inputs (every pending
configuration of one task/length/sample), so the dense reference and the stock-SDPA timing stay
in the same process as the methods they are compared with. The driver writes rows as they come.
"""

from __future__ import annotations

from collections.abc import Callable


def _ray():
    try:
        import ray
    except ImportError:
        raise ValueError("--ray needs the ray extra: pip install 'attnsieve[ray]'") from None
    return ray


def run_on_ray(spec, work, address: str, keep: Callable[[list[dict]], None],
               progress: Callable[[str], None] | None = None, workers: int | None = None) -> None:
    """Evaluate `work` (from runner.pending_work) on Ray; `address` is a cluster address, "auto",
    or "local" to start a local instance in this process."""
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, include_dashboard=False,
                 log_to_driver=False, ignore_reinit_error=True)
    if not work:
        return
    n = workers or max(1, min(len(work), int(ray.available_resources().get("CPU", 1))))

    @ray.remote(num_cpus=1)
    class Worker:
        def __init__(self, model_name: str, threads: int, dtype: str):
            import torch

            from attnsieve.models import load

            torch.set_num_threads(threads)
            self.model, self.tok = load(model_name, dtype=dtype)

        def evaluate(self, spec, item, todo):
            from attnsieve.eval.runner import evaluate_input

            task, length, i = item
            return evaluate_input(self.model, self.tok, spec, task, length, i, todo)

    pool = [Worker.remote(spec.model, 1, spec.dtype) for _ in range(n)]
    pending = {}
    queue = list(work)
    for w in pool:
        if queue:
            item, todo = queue.pop(0)
            pending[w.evaluate.remote(spec, item, todo)] = (w, item)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        w, item = pending.pop(ready[0])
        keep(ray.get(ready[0]))
        if progress:
            progress(f"{item[0]} {item[1]} #{item[2]} done on Ray")
        if queue:
            nxt, todo = queue.pop(0)
            pending[w.evaluate.remote(spec, nxt, todo)] = (w, nxt)
