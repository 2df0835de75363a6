"""Data: BIG-bench multiple-choice tasks, JSONL prompt/response records, client partitions."""

from fedproxy_secure.data.bigbench import MCExample, Task, list_tasks, load_task, split_task
from fedproxy_secure.data.jsonl import PromptResponse, load_jsonl
from fedproxy_secure.data.partition import partition_dirichlet, partition_iid, partition_by_task

__all__ = [
    "MCExample", "PromptResponse", "Task", "list_tasks", "load_jsonl", "load_task",
    "partition_by_task", "partition_dirichlet", "partition_iid", "split_task",
]
