"""The ``taskmanager`` console script: assembles the command modules into one group."""

from __future__ import annotations

import click

from cli import admin, archive, backup, jobs, outbox, processes, queues, reindex


@click.group()
@click.version_option(package_name="taskmanager")
def main() -> None:
    """Task manager platform: web API, workers, scheduler and operator tools."""


for command in (
    processes.web,
    processes.worker,
    processes.run,
    admin.admin,
    reindex.reindex,
    queues.queues,
    queues.dead,
    queues.healthcheck,
    jobs.scheduler,
    jobs.schedules,
    jobs.run_job,
    backup.backup,
    archive.archiver,
    outbox.outbox,
):
    main.add_command(command)


if __name__ == "__main__":
    main()
