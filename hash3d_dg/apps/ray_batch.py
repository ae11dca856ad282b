"""Batch runs on Ray: ``python main.py --image DIR --ray [ADDRESS]``.

The driver lists the images, skips those whose complete result already exists (unless
``--overwrite``), and hands the rest out one at a time from a shared queue to a pool of Ray
actors: one per GPU (``num_gpus=1``) when the cluster has GPUs, or several per GPU with
``--ray-gpus-per-worker F`` (a fraction: ``0.25`` puts four on each GPU, each loading its own
model), else ``--ray-workers`` CPU actors. Each actor builds one ``RunContext`` (the guidance model loads once per actor) and calls
the CLI's ``run_image`` for every image it is given, writing the same per-image folders as the
CLI. A failing image never stops the others; an image whose worker died (crash, OOM kill) goes
back to the queue once, to another worker, and is reported failed if that one dies too; a dead
worker is replaced while work remains. At the end ``<output>/batch_report.json`` lists every
image (status done / failed / skipped, worker, seconds per stage, cache hit rate, error line)
and the summary line; the exit status is 2 when any image failed, as for the CLI.

No ADDRESS starts a local Ray instance on this machine; ``auto`` or ``host:port`` joins a
running cluster (``ray start --head`` on one node, ``ray start --address=HEAD:6379`` on the
others). The output folder must then be on a file system every node sees.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from hash3d_dg.errors import ConfigError, UserError

log = logging.getLogger("hash3d_dg.batch")

REPORT_NAME = "batch_report.json"
MAX_ATTEMPTS = 2  # a killed worker's image is retried once, on another worker
LOCAL = "local"
STAGE_KEYS = ("preprocess", "load", "stage1", "mesh", "stage2", "export")
LOCAL_OBJECT_STORE_BYTES = 128 * 1024**2  # only small reports travel through it
PACKAGE_ROOT = Path(__file__).resolve().parent.parent



def error_line(exc: BaseException, image) -> str:
    """The one line the CLI prints for a failed image."""
    from hash3d_dg.pipeline import error_line as line

    return line(exc, image)


def stage_seconds(report: dict) -> dict:
    seconds = {k: report[k]["seconds"] for k in STAGE_KEYS if isinstance(report.get(k), dict) and "seconds" in report[k]}
    seconds["total"] = report.get("total_seconds")
    return seconds


def complete_report(output_root: Path, name: str, stage: str) -> dict | None:
    """The report of ``name``'s complete result under ``output_root`` (every file it lists is
    there and it ran ``stage``), or None."""
    folder = output_root / name
    try:
        report = json.loads((folder / f"{name}_report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("stage") != stage or not report.get("outputs"):
        return None
    if not all((folder / fname).is_file() for fname in report["outputs"]):
        return None
    return report


def image_row(image, name: str, status: str, worker=None, report: dict | None = None,
              error: str | None = None, attempts: int = 0) -> dict:
    from hash3d_dg.apps.common import summary_line

    row = {"image": str(image), "name": name, "status": status, "worker": worker,
           "seconds": stage_seconds(report) if report else {},
           "hit_rate": report.get("unet_total", {}).get("hit_rate") if report else None,
           "error": error, "attempts": attempts}
    text = getattr(image, "text", None)  # a prompts.TextPrompt
    if text is not None:
        row["prompt"] = text
    if report:
        row["summary"] = summary_line(name, report)
    return row


class Worker:
    """One Ray actor: one RunContext (model loaded once), many images."""

    def __init__(self, name: str, config: str, overrides: list[str], output_root: str, stage: str,
                 debug: bool) -> None:
        from hash3d_dg.apps.common import configure_logging

        configure_logging(debug, stream=sys.stderr)
        if not debug:
            logging.getLogger("hash3d_dg").setLevel(logging.WARNING)
        self.name, self.output_root, self.stage, self.debug = name, output_root, stage, debug
        self.ctx, self.error = None, None
        try:
            from hash3d_dg.config import load_config
            from hash3d_dg.pipeline import RunContext

            self.ctx = RunContext.create(load_config(config, overrides), progress=False)
            self.ctx.guidance()
        except Exception as exc:  # noqa: BLE001 - reported to the driver as one line
            self.error = error_line(exc, "worker start-up")

    def info(self) -> dict:
        return {"worker": self.name, "pid": os.getpid(), "host": socket.gethostname(),
                "device": str(self.ctx.device) if self.ctx is not None else None, "error": self.error}

    def run(self, image: str, name: str, attempts: int) -> dict:
        from hash3d_dg.pipeline import run_image

        try:
            report = run_image(image, self.ctx, self.output_root, name=name, stage=self.stage)
        except Exception as exc:  # noqa: BLE001 - one failing image never stops the others
            if self.debug:
                logging.getLogger("hash3d_dg").exception("%s failed", image)
            return image_row(image, name, "failed", self.name, error=error_line(exc, image), attempts=attempts)
        return image_row(image, name, "done", self.name, report=report, attempts=attempts)


@dataclass
class _Item:
    image: Path
    name: str
    attempts: int = 0
    died_on: list = field(default_factory=list)


@dataclass
class _Slot:
    name: str
    actor: object
    info: dict | None = None


def _address(args) -> str:
    """``--ray`` eats a following ``key=value`` word (nargs='?'): give it back to the overrides."""
    address = args.ray
    if "=" in address:
        args.overrides.append(address)
        address = LOCAL
    return address


def _connect(ray, address: str, workers: int | None, debug: bool) -> None:
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    kwargs = {"runtime_env": {"env_vars": env}, "logging_level": logging.INFO if debug else logging.WARNING,
              "log_to_driver": True}
    try:
        if address == LOCAL:
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, workers or 0), include_dashboard=False,
                     object_store_memory=LOCAL_OBJECT_STORE_BYTES, _node_ip_address="127.0.0.1", **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        where = "start a local Ray instance" if address == LOCAL else f"connect to the Ray cluster at '{address}'"
        raise ConfigError(f"cannot {where}: {first} (start one with `ray start --head`, or drop the address "
                          "to run on this machine)") from None


class _Pool:
    """Actors handed images one at a time from the driver's queue."""

    def __init__(self, ray, size: int, use_gpu: bool, init_args: tuple,
                 gpus_per_worker: float = 1.0) -> None:
        self.ray, self.use_gpu, self.init_args = ray, use_gpu, init_args
        self.remote_cls = ray.remote(Worker).options(
            num_gpus=gpus_per_worker if use_gpu else 0, num_cpus=1, max_restarts=0,
            max_task_retries=0)
        self.count = 0
        self.replacements_left = size  # replace dead workers, within bounds
        self.starting: dict = {}  # ref of info() -> slot
        self.idle: list[_Slot] = []
        self.workers: list[dict] = []
        for _ in range(size):
            self.start()

    def start(self) -> None:
        self.count += 1
        name = f"worker-{self.count}"
        actor = self.remote_cls.remote(name, *self.init_args)
        self.starting[actor.info.remote()] = _Slot(name, actor)

    def replace(self) -> None:
        if self.replacements_left > 0:
            self.replacements_left -= 1
            self.start()

    def stop(self) -> None:
        for slot in self.idle + list(self.starting.values()):
            self.ray.kill(slot.actor)


def _run_pool(ray, pending: deque, size: int, use_gpu: bool, init_args: tuple,
              gpus_per_worker: float = 1.0) -> tuple[list[dict], list[dict]]:
    """Run every pending image; returns (rows, the workers' info)."""
    rows: list[dict] = []
    pool = _Pool(ray, size, use_gpu, init_args, gpus_per_worker)
    inflight: dict = {}  # ref of run() -> (slot, item)
    from ray.exceptions import RayActorError

    while pending or inflight:
        while pending and pool.idle:
            slot, item = pool.idle.pop(0), pending.popleft()
            if item.died_on and slot.name in item.died_on and pool.idle:
                pool.idle.append(slot)  # prefer a worker this image has not killed
                slot = pool.idle.pop(0)
            item.attempts += 1
            inflight[slot.actor.run.remote(_wire(item.image), item.name, item.attempts)] = (slot, item)
            log.info(f"[{item.name}] started on {slot.name} (pid {slot.info['pid']}, attempt {item.attempts})")
        if not inflight and not pool.starting:
            for item in pending:
                line = "error: no Ray worker is left to run it (every worker died or failed to start)"
                rows.append(image_row(item.image, item.name, "failed", error=line, attempts=item.attempts))
                print(line + f": {item.image}", file=sys.stderr)
            pending.clear()
            break
        ready, _ = ray.wait(list(inflight) + list(pool.starting), num_returns=1)
        ref = ready[0]
        if ref in pool.starting:
            slot = pool.starting.pop(ref)
            try:
                slot.info = ray.get(ref)
            except RayActorError as exc:
                log.warning(f"{slot.name} died while starting: {str(exc).splitlines()[0]}")
                pool.replace()
                continue
            pool.workers.append(slot.info)
            if slot.info["error"]:  # a config or model problem fails every worker the same way
                print(slot.info["error"], file=sys.stderr)
                for item in pending:
                    rows.append(image_row(item.image, item.name, "failed", slot.name, error=slot.info["error"],
                                          attempts=item.attempts))
                pending.clear()
                ray.kill(slot.actor)
                continue
            log.info(f"{slot.name} ready on {slot.info['host']} (pid {slot.info['pid']}, device {slot.info['device']})")
            pool.idle.append(slot)
            continue
        slot, item = inflight.pop(ref)
        try:
            row = ray.get(ref)
        except RayActorError as exc:
            item.died_on.append(slot.name)
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.warning(f"[{item.name}] {slot.name} died while running it ({reason})")
            if item.attempts < MAX_ATTEMPTS:
                pending.appendleft(item)
            else:
                line = (f"error: the worker died on {item.image} on each of {item.attempts} attempts "
                        f"({', '.join(item.died_on)}); it may crash the process (out of memory?)")
                print(line, file=sys.stderr)
                rows.append(image_row(item.image, item.name, "failed", slot.name, error=line, attempts=item.attempts))
            if pending:
                pool.replace()
            continue
        pool.idle.append(slot)
        rows.append(row)
        if row["status"] == "done":
            log.info(f"[{item.name}] done on {slot.name}: {row['summary']}")
        else:
            print(row["error"], file=sys.stderr)
    pool.stop()
    return rows, pool.workers


def _wire(image):
    """What an actor is sent for an input: an image path as text, a prompt as itself."""
    from hash3d_dg.prompts import TextPrompt

    return image if isinstance(image, TextPrompt) else str(image)


def main(args) -> int:
    """``main.py ... --ray [ADDRESS]``: ``args`` are the CLI's parsed arguments."""
    from hash3d_dg.output.atomic import write_json_atomic
    from hash3d_dg.apps.common import EXIT_USER_ERROR, overrides_from_args

    started = time.perf_counter()
    try:
        address = _address(args)
        if args.ray_workers is not None and args.ray_workers < 1:
            raise ConfigError(f"--ray-workers must be at least 1, got {args.ray_workers}")
        per_gpu = getattr(args, "ray_gpus_per_worker", None)
        if per_gpu is not None and not (0 < per_gpu <= 1 or float(per_gpu).is_integer()):
            raise ConfigError(f"--ray-gpus-per-worker must be a fraction in (0, 1] or a whole number, "
                              f"got {per_gpu}")
        if args.name:
            raise ConfigError("--name cannot be used with --ray (each input is named after its file or prompt)")
        from hash3d_dg.apps.common import collect_inputs
        from hash3d_dg.config import load_config
        from hash3d_dg.output.names import output_names

        overrides = overrides_from_args(args)
        cfg = load_config(args.config, overrides)
        images = collect_inputs(args, resolve=True)
        output_root = Path(args.output).resolve()
        # Checked before Ray starts: usable names, no two files sharing one (a file given twice runs once).
        names: dict[str, Path] = dict(zip(output_names(images, output_root, reserved=(REPORT_NAME,)), images))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR

    rows: dict[str, dict] = {}
    pending: deque = deque()
    for name, image in names.items():
        report = None if args.overwrite else complete_report(output_root, name, args.stage)
        if report is not None:
            rows[name] = image_row(image, name, "skipped", report=report)
            log.info(f"[{name}] skipped: complete result in {output_root / name} (--overwrite reruns it)")
        else:
            pending.append(_Item(image, name))

    workers: list[dict] = []
    ray_address = None
    if pending:
        if address == LOCAL and "ray" not in sys.modules:
            # A local instance serves this driver only: keep Ray on the loopback interface
            # (read by Ray when it is first imported).
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        import ray

        owned = not ray.is_initialized()  # a driver already connected (notebook, tests) stays so
        try:
            if owned:
                _connect(ray, address, args.ray_workers, args.debug)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USER_ERROR
        try:
            ray_address = ray.get_runtime_context().gcs_address
            gpus = int(ray.cluster_resources().get("GPU", 0))
            use_gpu = gpus > 0 and cfg.device != "cpu"
            # several workers may share a GPU (--ray-gpus-per-worker 0.25: four per GPU; a stage-1
            # iteration keeps a GPU 25-39 % busy, so the GPU has room for the others' kernels)
            per_gpu = float(getattr(args, "ray_gpus_per_worker", None) or 1.0)
            size = args.ray_workers or (max(1, int(gpus / per_gpu + 1e-9)) if use_gpu else 1)
            size = min(size, len(pending))
            log.info(f"Ray at {ray_address}: {size} {'GPU' if use_gpu else 'CPU'} worker(s) for "
                     f"{len(pending)} image(s)" + (f", {len(rows)} skipped" if rows else ""))
            # A GPU actor sees only its own GPU (Ray sets CUDA_VISIBLE_DEVICES): plain "cuda".
            worker_overrides = overrides + (["device=cuda"] if use_gpu and cfg.device not in ("auto", "cuda") else [])
            init_args = (args.config, worker_overrides, str(output_root), args.stage, args.debug)
            pool_rows, workers = _run_pool(ray, pending, size, use_gpu, init_args, per_gpu)
            for row in pool_rows:
                rows[row["name"]] = row
        finally:
            if owned:
                ray.shutdown()

    ordered = [rows[name] for name in names if name in rows]
    counts = {s: sum(r["status"] == s for r in ordered) for s in ("done", "failed", "skipped")}
    failed = [r["image"] for r in ordered if r["status"] == "failed"]
    summary = (f"done in {time.perf_counter() - started:.1f}s: {counts['done']} succeeded, {counts['failed']} failed, "
               f"{counts['skipped']} skipped" + (": " + ", ".join(failed) if failed else ""))
    batch = {"summary": summary, "counts": counts, "ray_address": ray_address, "config": args.config,
             "overrides": overrides, "output": str(output_root), "workers": workers, "images": ordered}
    try:
        write_json_atomic(output_root / REPORT_NAME, batch)
    except OSError as exc:
        print(f"error: cannot write {output_root / REPORT_NAME}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    log.info(summary)
    log.info(f"batch report: {output_root / REPORT_NAME}")
    return EXIT_USER_ERROR if failed else 0

