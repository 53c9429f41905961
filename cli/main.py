"""The ``taskmanager`` console script: assembles the command modules into one group."""

from __future__ import annotations

import click

from cli import (
    admin,
    archive,
    backlog,
    backup,
    jobs,
    messages,
    monitor,
    outbox,
    processes,
    queues,
    reindex,
    share_weights,
)
from cli.common import DEFAULT_DATA_DIR, set_service_options


@click.group()
@click.version_option(package_name="taskmanager")
@click.option("--redis-url", default=None, help="Redis to use (instead of REDIS_URL).")
@click.option("--mongodb-url", default=None, help="MongoDB to use (instead of MONGODB_URL).")
@click.option(
    "--data-dir",
    default=None,
    help=f"Data directory of a `taskmanager run` whose services to use when the variables are "
    f"unset (default: {DEFAULT_DATA_DIR}).",
)
@click.pass_context
def main(
    ctx: click.Context, redis_url: str | None, mongodb_url: str | None, data_dir: str | None
) -> None:
    """Task manager platform: web API, workers, scheduler and operator tools.

    Operator commands find MongoDB and Redis in --mongodb-url/--redis-url, else MONGODB_URL/
    REDIS_URL, else in the urls.json a `taskmanager run` writes in its data directory.
    Read-only commands need no JWT_SECRET."""
    set_service_options(ctx, redis_url, mongodb_url, data_dir)


for command in (
    processes.web,
    processes.worker,
    processes.run,
    admin.admin,
    reindex.reindex,
    queues.queues,
    queues.dead,
    messages.message,
    queues.healthcheck,
    monitor.workers,
    monitor.stats,
    monitor.health,
    jobs.scheduler,
    jobs.schedules,
    jobs.run_job,
    backup.backup,
    archive.archiver,
    outbox.outbox,
    backlog.backlog,
    share_weights.share_weights,
):
    main.add_command(command)
# One message at a time and pausing (cli/messages.py), under the queue commands' groups.
for group, sub in (
    (queues.queues, messages.queues_messages),
    (queues.queues, messages.queues_pause),
    (queues.queues, messages.queues_resume),
    (queues.dead, messages.dead_show),
    (queues.dead, messages.dead_delete),
):
    group.add_command(sub)


if __name__ == "__main__":
    main()
