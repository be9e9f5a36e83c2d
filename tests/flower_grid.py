"""In-process Flower for tests: a Grid whose subclasses implement get_node_ids and
send_and_receive (the Message API the strategies and the FedRecon executor use), and the task
identity Flower's runtimes give their processes (messages need it)."""

import pytest
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture(scope="module", autouse=True)
def task_identity():
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class StubGrid(Grid):
    def create_message(self, *args, **kwargs):  # pragma: no cover - deprecated API
        raise NotImplementedError

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def set_run(self, run_id):  # pragma: no cover
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError
