"""`mmrecall cluster-local`: a TF_CONFIG cluster of `mmrecall train` processes on one machine.

It starts one chief, `--workers` workers, `--ps` parameter servers and (optionally) one
evaluator, each a separate `mmrecall train` process with its own TF_CONFIG on free
localhost ports, the way `tf.estimator.train_and_evaluate` runs on real machines. It waits
for the chief and workers to finish and for the evaluator to evaluate the final checkpoint,
then stops every process it started by process id: parameter servers never exit by
themselves.

    mmrecall cluster-local --workers 1 --ps 1 --log-dir LOGS -- \
        --data PREP_DIR --model-dir MODEL_DIR --steps 300

On real machines set TF_CONFIG yourself (see the README) and run `mmrecall train` with the
same arguments on every machine.
"""
import argparse
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

CHIEF, WORKER, PS, EVALUATOR = "chief", "worker", "ps", "evaluator"


def free_ports(count: int, host: str = "127.0.0.1") -> List[int]:
    """Asks the OS for `count` distinct free TCP ports on `host`."""
    sockets, ports = [], []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


def cluster_spec(num_workers: int, num_ps: int, ports: Sequence[int],
                 host: str = "localhost") -> Dict[str, List[str]]:
    """The `cluster` part of TF_CONFIG: chief first, then workers, then ps.

    The evaluator is not part of the cluster spec; it only reads checkpoints.
    """
    if len(ports) != 1 + num_workers + num_ps:
        raise ValueError(f"need {1 + num_workers + num_ps} ports, got {len(ports)}")
    addresses = [f"{host}:{p}" for p in ports]
    spec = {CHIEF: addresses[:1], PS: addresses[1 + num_workers:]}
    if num_workers:
        spec[WORKER] = addresses[1:1 + num_workers]
    return spec


def tf_config(cluster: Dict[str, List[str]], task_type: str, index: int) -> str:
    """The TF_CONFIG JSON for one task of `cluster`."""
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


@dataclasses.dataclass
class Task:
    """One started process of the cluster."""
    task_type: str
    index: int
    process: subprocess.Popen
    log_path: str

    @property
    def name(self) -> str:
        return f"{self.task_type}:{self.index}"


@dataclasses.dataclass
class ClusterResult:
    """Exit codes by task name ("chief:0", "worker:0", ...); None = still running when we
    stopped it (what a ps should be: it serves until stopped)."""
    exit_codes: Dict[str, Optional[int]]
    pids: Dict[str, int]
    log_dir: str
    seconds: float

    @property
    def ok(self) -> bool:
        return all(code is None if name.startswith(PS) else code == 0
                   for name, code in self.exit_codes.items())


def _start(task_type: str, index: int, cluster, train_argv, log_dir, env_extra) -> Task:
    env = dict(os.environ, **env_extra)
    env["TF_CONFIG"] = tf_config(cluster, task_type, index)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    log_path = os.path.join(log_dir, f"{task_type}-{index}.log")
    log = open(log_path, "ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "mmrecall_cli", "train", *train_argv],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        start_new_session=True)  # its own process group, so we can stop its children too
    log.close()
    return Task(task_type, index, process, log_path)


def _stop(task: Task, grace_seconds: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after the grace period, to the task's whole process group."""
    if task.process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace_seconds), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(task.process.pid, sig)
        except ProcessLookupError:
            return
        try:
            task.process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_local_cluster(train_argv: Sequence[str], log_dir: str, num_workers: int = 1,
                      num_ps: int = 1, evaluator: bool = True, timeout_seconds: float = 1800,
                      env_extra: Optional[Dict[str, str]] = None) -> ClusterResult:
    """Runs `mmrecall train train_argv` as a local TF_CONFIG cluster and stops it cleanly.

    Args:
      train_argv: arguments of `mmrecall train`, the same for every task.
      log_dir: one `<type>-<index>.log` per task goes here.
      num_workers: workers besides the chief (>= 0).
      num_ps: parameter servers (>= 1: the Estimator's distributed mode needs one).
      evaluator: also start an evaluator task.
      timeout_seconds: wall-clock limit for the whole cluster.
      env_extra: extra environment variables for every task.
    Returns:
      ClusterResult with every task's exit code (a ps still serving when stopped: None;
      one that exited by itself, which stops the cluster: its code, and not ok).
    Raises:
      TimeoutError: the chief or a worker did not finish in time (all tasks are stopped).
    """
    if num_ps < 1:
        raise ValueError("the Estimator's distributed mode needs at least one ps")
    os.makedirs(log_dir, exist_ok=True)
    cluster = cluster_spec(num_workers, num_ps, free_ports(1 + num_workers + num_ps))
    env_extra = dict(env_extra or {})
    start = time.time()
    tasks: List[Task] = []
    try:
        tasks += [_start(PS, i, cluster, train_argv, log_dir, env_extra) for i in range(num_ps)]
        tasks.append(_start(CHIEF, 0, cluster, train_argv, log_dir, env_extra))
        tasks += [_start(WORKER, i, cluster, train_argv, log_dir, env_extra)
                  for i in range(num_workers)]
        if evaluator:
            tasks.append(_start(EVALUATOR, 0, cluster, train_argv, log_dir, env_extra))
        # Chief, workers and evaluator end by themselves (the evaluator after evaluating
        # the final checkpoint); a ps serves until stopped. A failed chief or a ps that
        # exits makes the others wait forever, so stop on either.
        finishers = [t for t in tasks if t.task_type != PS]
        servers = [t for t in tasks if t.task_type == PS]
        while any(t.process.poll() is None for t in finishers):
            if time.time() - start > timeout_seconds:
                raise TimeoutError(
                    f"cluster did not finish in {timeout_seconds:.0f}s; logs in {log_dir}")
            if (any(t.process.poll() not in (None, 0) for t in finishers)
                    or any(t.process.poll() is not None for t in servers)):
                break
            time.sleep(0.5)
        codes = {t.name: t.process.poll() for t in tasks}
    finally:
        for task in tasks:
            _stop(task)
    return ClusterResult(codes, {t.name: t.process.pid for t in tasks}, log_dir,
                         time.time() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmrecall cluster-local",
        description="Run `mmrecall train` as a TF_CONFIG cluster (chief, workers, ps, "
                    "evaluator) on localhost; every started process is stopped at the end.",
        epilog="Arguments after `--` go to every task's `mmrecall train`.")
    parser.add_argument("--workers", type=int, default=1, help="workers besides the chief")
    parser.add_argument("--ps", type=int, default=1, help="parameter servers (>= 1)")
    parser.add_argument("--no-evaluator", action="store_true", help="start no evaluator")
    parser.add_argument("--log-dir", required=True, help="per-task logs go here")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds for the cluster")
    parser.add_argument("train_args", nargs=argparse.REMAINDER,
                        help="-- then the `mmrecall train` arguments")
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if not train_args:
        parser.error("give the `mmrecall train` arguments after --")
    if args.workers < 0 or args.ps < 1:
        parser.error("--workers must be >= 0 and --ps >= 1")
    result = run_local_cluster(train_args, args.log_dir, args.workers, args.ps,
                               not args.no_evaluator, args.timeout)
    for name, code in result.exit_codes.items():
        state = "stopped by us" if code is None else f"exit {code}"
        print(f"{name:12s} {state}")
    print(f"cluster finished in {result.seconds:.0f}s; logs in {result.log_dir}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
