"""Ray's wrappers peeled off a worker's exception; the session's logs linked into a run's log folder."""

from __future__ import annotations

from ray.exceptions import RayTaskError
from ray.train import ControllerError, WorkerGroupError

from actors.cluster import link_session_logs, root_cause
from imm_ray.data.registry import DataError


def test_root_cause_unwraps_task_errors_and_train_worker_groups():
    cause = DataError("gsm8k: no data file")
    task = RayTaskError("f", "Traceback ...", cause)
    assert root_cause(task) is cause
    group = WorkerGroupError("training failed", {1: ValueError("rank 1"), 0: RayTaskError("g", "tb", cause)})
    assert root_cause(group) is cause  # the lowest rank's failure, under its task error
    assert root_cause(ControllerError(task)) is cause
    plain = KeyError("not Ray's")
    assert root_cause(plain) is plain


def test_session_logs_are_linked_where_they_exist(tmp_path):
    session = tmp_path / "session_1"
    (session / "logs").mkdir(parents=True)
    link = link_session_logs(session, tmp_path / "run" / "logs")
    assert link is not None and link.resolve() == (session / "logs").resolve()
    again = link_session_logs(session, tmp_path / "run" / "logs")  # a second invocation replaces the link
    assert again == link
    assert link_session_logs(tmp_path / "elsewhere", tmp_path / "run" / "logs") is None  # a remote head's path
